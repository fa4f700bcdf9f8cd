"""Sample text from a trained language model.

    python -m attention_simulator.generate ckpt=RUN/checkpoints/step_0002000.pt prompt="The " [key=value ...]
    python -m attention_simulator.generate ckpt=... 'prompt=["The ","Once upon a time"]'   # one batch

Options (configs/generate.yaml): max_new_tokens, temperature, top_k, top_p, stop, num_samples,
seed, device, use_cache.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import load_checkpoint
from .cli import exit_on_user_error, run_cli
from .config import CONFIG_DIR
from .data.tokenizers import tokenizer_from_json
from .errors import CheckpointError, ConfigError
from .generation import generate_text
from .train import build_model


def load_language_model(ckpt: Path, device: str = "cpu"):
    """(model, tokenizer) of a language-model checkpoint, rebuilt from its run's config."""
    ckpt = Path(ckpt).expanduser()
    state = load_checkpoint(ckpt, fix="ckpt= takes a checkpoints/step_*.pt file of a language-model run.")
    config_path = ckpt.parent.parent / ".hydra" / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(
            f"{str(config_path)!r} not found: ckpt must be inside a run directory (RUN/checkpoints/)."
        )
    tokenizer_state = state.get("data", {}).get("tokenizer")
    if tokenizer_state is None:
        raise ConfigError(f"{str(ckpt)!r} is not a language-model checkpoint (it has no tokenizer).")
    tokenizer = tokenizer_from_json(tokenizer_state)
    model = build_model(OmegaConf.load(config_path), {"vocab_size": tokenizer.vocab_size})
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer


def _unescape(text: str | None) -> str | None:
    """Command-line strings: `\\n` and `\\t` as typed mean a newline and a tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


OPTION_RULES = {  # key: (test, what the value must be)
    "max_new_tokens": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "num_samples": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1, or null for no limit"),
    "top_p": (lambda v: v is None or (_number(v) and 0 < v <= 1), "in (0, 1], or null for no limit"),
}


def check_options(cfg: DictConfig):
    """Sampling options, checked before the model is loaded."""
    for key, (ok, rule) in OPTION_RULES.items():
        if not ok(cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} must be {rule}.")


def sample(cfg: DictConfig) -> list[str]:
    check_options(cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tokenizer = load_language_model(Path(cfg.ckpt), device)
    generator = torch.Generator().manual_seed(cfg.seed)
    options = dict(stop=_unescape(cfg.stop), temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   use_cache=cfg.use_cache, generator=generator)  # fmt: skip
    prompts = [_unescape(p) for p in ([cfg.prompt] if isinstance(cfg.prompt, str) else cfg.prompt)]
    batch = [p for p in prompts for _ in range(cfg.num_samples)]  # every sample of every prompt in one batch
    return [p + text for p, text in zip(batch, generate_text(model, tokenizer, batch, cfg.max_new_tokens, **options))]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig):
    with exit_on_user_error("generate"):
        texts = sample(cfg)
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- sample {i + 1} of {len(texts)} ---")
            print(text)


if __name__ == "__main__":
    run_cli(main, "generate")
