"""The model card's sections that a run with M-FAC or with adapters adds to HF's card."""
from __future__ import annotations

import torch

MODEL_CARD = "README.md"  # where Trainer.create_model_card writes


def mfac_card_section(settings: dict) -> str:
    """The model card's M-FAC section: the optimizer's paper and each of its arguments."""
    rows = "".join(f"| {key} | {value} |\n" for key, value in settings.items())
    return ("\n## Optimizer: M-FAC\n\nTrained with M-FAC (Frantar, Kurtic, Alistarh, \"M-FAC: Efficient Matrix-Free "
            "Approximations of Second-Order Information\", NeurIPS 2021), package `mfac-optim`, with these "
            f"arguments:\n\n| argument | value |\n|---|---|\n{rows}")


def names_module(module: str, target: str) -> bool:
    """Whether a target module name, as PEFT matches them, names the module `module` (its whole name or its last
    parts)."""
    return module == target or module.endswith("." + target)


def adapter_card_section(model: torch.nn.Module) -> str:
    """The model card's lines on the adapters of a PEFT model ("" for any other model)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return ""
    config = next(iter(configs.values()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    module_names = [name for name, _ in model.named_modules()]
    full = [name for name in sorted(config.modules_to_save or [])  # PEFT names heads of other models too
            if any(names_module(module, name) for module in module_names)]
    return (f"\n\n## Adapters: LoRA\n\nTrained as LoRA adapters (PEFT) with r = {config.r}, lora_alpha = "
            f"{config.lora_alpha:g}, lora_dropout = {config.lora_dropout:g} on {', '.join(sorted(config.target_modules))}; "
            f"trained in full: {', '.join(full)}. {trainable:,} of {total:,} parameters train.\n")
