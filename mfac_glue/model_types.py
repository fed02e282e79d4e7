"""Model configs without "model_type" (prajjwal1/bert-mini, bert-tiny, Google's converted checkpoints): transformers 5
refuses them; here they get the type transformers 4 inferred from the name, checked against the config's keys."""
from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Optional

from . import UsageError

logger = logging.getLogger(__name__)


def hub_options(model_args) -> dict:
    """Where and which version to read from the Hub (or its cache): for every from_pretrained."""
    return dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)


def check_model_configs(model_args) -> None:
    """Reads the config of the model and of the tokenizer before anything loads, so that a config.json without
    "model_type" whose type cannot be inferred ends with one line (and an inferred one is logged once)."""
    config_flag, config_source = model_config_source(model_args)
    model_type_to_infer(config_source, config_flag, model_args)
    tokenizer_flag, tokenizer_source = tokenizer_source_of(model_args)
    model_type_to_infer(tokenizer_source, tokenizer_flag, model_args, required=False)


def model_config_source(model_args) -> tuple[str, str]:
    """(flag, Hub id or folder) of the model's config."""
    if model_args.config_name:
        return "--config_name", model_args.config_name
    return "--model_name_or_path", model_args.model_name_or_path


def tokenizer_source_of(model_args) -> tuple[str, str]:
    if model_args.tokenizer_name:
        return "--tokenizer_name", model_args.tokenizer_name
    return "--model_name_or_path", model_args.model_name_or_path


def model_type_to_infer(source: str, flag: str, model_args, required: bool = True) -> Optional[str]:
    """None when `source`'s config.json declares its "model_type" (or, for an optional config, does not exist);
    else the model type inferred from its name. Config files come from a folder, the Hub or the Hub's cache."""
    try:
        return undeclared_model_type(source, **hub_options(model_args))
    except OSError as error:  # transformers' "not found / cannot connect", usually several lines
        if not required:
            return None
        raise UsageError(f"{flag}: cannot read the config of {source!r}: {' '.join(str(error).split())}") from None
    except UsageError as error:
        raise UsageError(f"{flag}: {error}") from None


@functools.lru_cache(maxsize=None)  # the model and tokenizer often share a source: infer and warn once
def undeclared_model_type(source: str, cache_dir: Optional[str], revision: str, token: Optional[str]) -> Optional[str]:
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(source, cache_dir=cache_dir, revision=revision, token=token)
    if "model_type" in config_dict:
        return None
    model_type = model_type_from_name(source)
    if model_type is None:
        raise UsageError(f"the config.json of {source!r} has no \"model_type\" and its name names no known model "
                         "type: add \"model_type\" (e.g. \"bert\") to config.json, or pass --config_name with a "
                         "config that has one")
    check_keys_fit(config_dict, model_type, source)
    logger.warning("%s: config.json has no \"model_type\"; inferred %r from the name, as transformers 4 did",
                   source, model_type)
    return model_type


def model_type_from_name(source: str) -> Optional[str]:
    """transformers 4's rule: the longest known model type that occurs in the name, here a Hub id, a local
    folder's own name, or the repository of a Hub cache folder (models--org--name/snapshots/<revision>)."""
    from transformers import CONFIG_MAPPING

    names = [source]
    if os.path.isdir(source):
        path = Path(source).resolve()
        names = [path.name] + [part for part in path.parts if part.startswith("models--")]
    for name in names:
        found = [model_type for model_type in CONFIG_MAPPING.keys() if model_type in name.lower()]
        if found:
            return max(found, key=len)
    return None


def check_keys_fit(config_dict: dict, model_type: str, source: str) -> None:
    """An inferred type must know most of the config's own keys: a name can mislead (a GPT-2 config in a folder
    called bert-gpt2), and a wrong type would silently build another architecture."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_class = CONFIG_MAPPING[model_type]
    known = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    generic = set(PretrainedConfig().to_dict())
    own = [key for key in config_dict if key not in generic]
    unknown = [key for key in own if key not in known]
    if not own or 2 * len(unknown) > len(own):
        raise UsageError(f"the config.json of {source!r} has no \"model_type\"; its name suggests {model_type!r}, but "
                         f"its keys do not fit that type (unknown to it: {', '.join(unknown) or 'all'}): add "
                         "\"model_type\" to config.json, or pass --config_name with a config that has one")


def load_config(model_args, **kwargs):
    """The model's config (`AutoConfig.from_pretrained`'s keyword arguments), also from a config.json without
    "model_type"."""
    flag, source = model_config_source(model_args)
    return config_from(source, flag, model_args, **kwargs)


def config_from(source: str, flag: str, model_args, **kwargs):
    """`AutoConfig.from_pretrained`, or the inferred type's config class when config.json has no model_type."""
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = model_type_to_infer(source, flag, model_args)
    if model_type is None:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code, **hub_options(model_args), **kwargs)
    return CONFIG_MAPPING[model_type].from_pretrained(source, **hub_options(model_args), **kwargs)


def load_tokenizer(model_args):
    """`AutoTokenizer.from_pretrained` with HF's script's options, also for a config.json without "model_type"
    (AutoTokenizer reads the config to pick the tokenizer class and would fail on one)."""
    from transformers import AutoTokenizer

    flag, source = tokenizer_source_of(model_args)
    inferred = model_type_to_infer(source, flag, model_args, required=False)
    given_config = {"config": config_from(source, flag, model_args)} if inferred else {}
    tokenizer = AutoTokenizer.from_pretrained(source, use_fast=model_args.use_fast_tokenizer, **given_config,
                                              trust_remote_code=model_args.trust_remote_code, **hub_options(model_args))
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        # transformers 5 can build a vocabulary of special tokens alone from a bad tokenizer folder, and then maps
        # every word to [UNK] without complaint.
        raise RuntimeError(f"tokenizer from {source} has only its {len(tokenizer)} special tokens; the folder needs "
                           "its vocab.txt or tokenizer.json")
    return tokenizer


def check_model_arguments(model_args) -> None:
    """A pretrained model, or a config and a tokenizer to train a randomly initialised one."""
    if model_args.model_name_or_path is None and model_args.config_name is None:
        raise UsageError("--model_name_or_path: required (or --config_name with --tokenizer_name for random init)")
    if model_args.model_name_or_path is None and model_args.tokenizer_name is None:
        raise UsageError("--tokenizer_name: required with --config_name when no --model_name_or_path is given")
