"""Export trained towers for inference without DeepSpeed, and embed raw inputs with them.

    python -m pretrain.export --checkpoint RUN/checkpoints/step000200 --output exported/

writes ``model.safetensors`` (full fp32 weights; ZeRO-partitioned states consolidated) and
``config.yaml`` (the run's resolved config). Then::

    from pretrain.export import Embedder
    emb = Embedder.load("exported/")
    emb.embed_texts(["a handwritten seven"])       # (1, embed_dim), L2-normalised
    emb.embed_images(["digit.png"])                 # paths, bytes or PIL images
    emb.embed("audio", ["clip.flac"])               # any modality, decoded as in training
"""
from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import torch
import yaml

from pretrain.config import Config, config_from_dict, to_dict
from pretrain.models import ContrastiveModel, build_model


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint folder, whatever its ZeRO stage."""
    folder = Path(folder)
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO stage 1-3: consolidate the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def model_from_state(cfg: Config, state: dict[str, torch.Tensor]) -> ContrastiveModel:
    """The plain (no DeepSpeed) model of ``cfg`` holding ``state`` (strict: every weight must fit)."""
    model = build_model(cfg.model, cfg.data, with_bias="logit_bias" in state)
    model.load_state_dict(state, strict=True)
    return model


def _run_config(folder: Path) -> Config:
    cfg_path = folder.parent.parent / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--checkpoint: no config.yaml in the run folder {folder.parent.parent}")
    return config_from_dict(yaml.safe_load(cfg_path.read_text()))


def export(checkpoint_folder: str | Path, output: str | Path) -> Path:
    from safetensors.torch import save_file

    folder, output = Path(checkpoint_folder), Path(output)
    if not folder.is_dir():
        raise FileNotFoundError(f"--checkpoint: no such folder: {folder}")
    cfg = _run_config(folder)
    state = consolidated_state_dict(folder)
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output / "model.safetensors"))
    (output / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return output


class Embedder:
    """A trained model in eval mode with each modality's decoder, for raw inputs."""

    def __init__(self, model: ContrastiveModel, cfg: Config, device: str | torch.device = "cpu"):
        from pretrain.data import build_modalities

        self.model, self.cfg, self.device = model.to(device).eval(), cfg, torch.device(device)
        modalities, _ = build_modalities(cfg.data, train=False)
        self.decoders = {m.name: m for m in modalities}

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "Embedder":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        return cls(model_from_state(cfg, load_file(str(folder / "model.safetensors"))), cfg, device)

    @staticmethod
    def _bytes(item) -> bytes:
        if isinstance(item, (bytes, bytearray)):
            return bytes(item)
        if isinstance(item, (str, Path)):
            return Path(item).read_bytes()
        if hasattr(item, "save"):  # a PIL image
            buf = io.BytesIO()
            item.save(buf, format="PNG")
            return buf.getvalue()
        raise TypeError(f"cannot read {type(item).__name__}: give bytes, a path or a PIL image")

    @torch.no_grad()
    def embed(self, modality: str, items: list, ext: str | None = None) -> torch.Tensor:
        """Embeds raw items of one modality (file paths, bytes, or PIL images): each is decoded as
        the tar member ``ext`` would be (default: from a path's suffix, else the decoder's first
        member type). Returns (len(items), embed_dim), L2-normalised."""
        if modality not in self.decoders:
            raise KeyError(f"no modality {modality!r}; this model has {sorted(self.decoders)}")
        mod = self.decoders[modality]
        rng = random.Random(0)
        rows = []
        for item in items:
            kind = ext or (Path(item).suffix.lstrip(".") if isinstance(item, (str, Path)) else mod.members[0])
            rows.append(mod.decoder.decode(self._bytes(item), kind, rng))
        x = torch.stack(rows).to(self.device)
        return self.model.encode(modality, x)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], modality: str = "text") -> torch.Tensor:
        return self.embed(modality, [t.encode("utf-8") for t in texts], ext="txt")

    def embed_images(self, images: list, modality: str = "image") -> torch.Tensor:
        return self.embed(modality, images, ext="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder: RUN/checkpoints/stepNNNNNN")
    parser.add_argument("--output", required=True, help="folder for model.safetensors and config.yaml")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {out / 'model.safetensors'} and {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
