"""Export trained towers for inference without DeepSpeed, and embed raw inputs with them.

    python -m pretrain.export --checkpoint RUN/checkpoints/step000200 --output exported/

writes ``model.safetensors`` (full fp32 weights; ZeRO-partitioned states consolidated) and
``config.yaml`` (the run's resolved config). ``--format open_clip`` writes OpenCLIP's folder layout
instead (``open_clip_config.json`` with ``model_cfg`` and the run's ``preprocess_cfg``, beside
``open_clip_model.safetensors``: ``open_clip.create_model_and_transforms("local-dir:DIR")``),
``--format hf`` a ``save_pretrained`` folder of transformers (CLIPModel or SiglipModel, with the run's
tokenizer and image processor: ``AutoProcessor``, ``pipeline``), for models whose towers have those
architectures (``pretrain.models.interop``) and for a timm + text_transformer model such as the
quickstart's (open_clip's CustomTextCLIP, transformers' VisionTextDualEncoderModel:
``pretrain.models.timm_bert``). A model or preprocessing a format cannot hold is refused
with the reason and every format, before the checkpoint's weights are read. Then::

    from pretrain.export import Embedder
    emb = Embedder.load("exported/")
    emb.embed_texts(["a handwritten seven"])       # (1, embed_dim), L2-normalised
    emb.embed_images(["digit.png"])                 # paths, bytes or PIL images
    emb.embed("audio", ["clip.flac"])               # any modality, decoded as in training
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import random
from pathlib import Path

import torch
import yaml

from pretrain.checkpoint import EXPORT_WEIGHTS, CheckpointError, FoundCheckpoint
from pretrain.cli import USAGE, exit_process, run_cli
from pretrain.config import Config, config_from_dict, to_dict
from pretrain.data import Modalities, build_modalities
from pretrain.data.decoders import to_device
from pretrain.models import FORMATS, ContrastiveModel, build_model
from pretrain.models.interop import refusal
from pretrain.remote import find_checkpoint  # a folder, or an s3:// (fsspec) URL fetched to a local cache


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint folder, whatever its ZeRO stage."""
    folder = Path(folder)
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO stage 1-3: consolidate the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def model_from_state(cfg: Config, state: dict[str, torch.Tensor], modalities: Modalities,
                     init: bool = False) -> ContrastiveModel:
    """The plain (no DeepSpeed) model of ``cfg`` holding ``state`` (strict: every weight must fit);
    ``model.init_from`` is not read again (``init``) since ``state`` holds every weight."""
    model_cfg = cfg.model if init else dataclasses.replace(cfg.model, init_from=None)
    model = build_model(model_cfg, modalities, objective=cfg.loss.build())
    model.load_state_dict(state, strict=True)
    return model


def load_weights(found: FoundCheckpoint, cfg: Config, modalities: Modalities) -> ContrastiveModel:
    """A plain model with the full fp32 weights of a checkpoint or an export."""
    if found.kind == "export":
        from safetensors.torch import load_file

        state = load_file(str(found.folder / EXPORT_WEIGHTS))
    else:
        state = consolidated_state_dict(found.folder)
    try:
        return model_from_state(cfg, state, modalities)
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint's weights do not fit the model of this config ({str(err).splitlines()[0]}); "
            f"leave out --config to use the run's own config.yaml"
        ) from None


def _weights(folder: Path, which: str) -> dict[str, torch.Tensor]:
    """The checkpoint's full fp32 state; ``which: ema``: with the moving average (``train.ema``) in
    place of every trained parameter."""
    state = consolidated_state_dict(folder)
    if which == "ema":
        from pretrain.ema import full_from_checkpoint

        try:
            averaged = full_from_checkpoint(folder)
        except ValueError as err:
            raise CheckpointError(f"--weights ema: {err}") from None
        state.update({k: v.to(state[k].dtype) for k, v in averaged.items()})
    return state


def export(checkpoint_folder: str | Path, output: str | Path, fmt: str = "native", weights: str = "live") -> Path:
    """The checkpoint's full weights in ``output``: our native layout, or (``fmt``) a registered
    format of the field (``open_clip``, ``hf``); ``weights``: ``live``, or ``ema`` (the moving
    average of a run trained with ``train.ema``)."""
    if weights not in ("live", "ema"):
        raise CheckpointError(f"--weights: live or ema, got {weights!r}")
    from safetensors.torch import save_file

    found = find_checkpoint(checkpoint_folder)
    if found.kind != "deepspeed":
        raise CheckpointError(f"--checkpoint: {found.folder} is already an export")
    if not found.config.is_file():
        raise CheckpointError(f"--checkpoint: no config.yaml in the run folder {found.run_dir}")
    cfg = config_from_dict(yaml.safe_load(found.config.read_text()))
    output = Path(output)
    if fmt != "native":
        if fmt not in FORMATS:
            raise refusal(fmt, "no such format")
        writer = FORMATS.get(fmt, "--format")()
        modalities = build_modalities(cfg.data, train=False)
        writer.check(cfg, {m.name: m.decoder for m in modalities})  # before the consolidation, which takes long
        model = model_from_state(cfg, _weights(found.folder, weights), modalities, init=False)
        model.inference_state_dict(fmt)  # first: refused when the objective's parameters have no place there
        writer.export(model, cfg, output)
        return output
    state = _weights(found.folder, weights)
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output / EXPORT_WEIGHTS))
    (output / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return output


class Embedder:
    """A trained model in eval mode with each modality's decoder, for raw inputs."""

    def __init__(self, model: ContrastiveModel, cfg: Config, modalities: Modalities,
                 device: str | torch.device = "cpu"):
        self.model, self.cfg, self.device = model.to(device).eval(), cfg, torch.device(device)
        self.decoders = {m.name: m for m in modalities}

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "Embedder":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        modalities = build_modalities(cfg.data, train=False)
        return cls(model_from_state(cfg, load_file(str(folder / EXPORT_WEIGHTS)), modalities), cfg, modalities,
                   device)

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
            kind = ext or (Path(item).suffix.lstrip(".") if isinstance(item, (str, Path)) else mod.members[0].lstrip("."))
            rows.append(mod.decoder.host_decode(self._bytes(item), kind, rng))
        # the decoder's device half (uint8 pixels normalised there) on the model's device, as in training
        x = to_device(torch.stack(rows), self.device, torch.float32, mod.decoder.device_transform)
        return self.model.encode(modality, x)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], modality: str = "text") -> torch.Tensor:
        return self.embed(modality, [t.encode("utf-8") for t in texts], ext="txt")

    def embed_images(self, images: list, modality: str = "image") -> torch.Tensor:
        return self.embed(modality, images, ext="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (RUN/checkpoints/stepNNNNNN) or a "
                        "run, or its URL (s3://..., as train.remote_sync mirrors it: downloaded to a local cache)")
    parser.add_argument("--output", required=True, help="folder for model.safetensors and config.yaml")
    parser.add_argument("--format", default="native", help="native (default), open_clip or hf")
    parser.add_argument("--weights", default="live", choices=["live", "ema"],
                        help="live (default) or ema: the moving average of a run trained with train.ema")
    args = parser.parse_args(argv)

    def run() -> None:
        out = export(args.checkpoint, args.output, args.format, args.weights)
        print(f"exported ({args.format}) to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))

    return run_cli(run, errors=[(CheckpointError, USAGE)])


if __name__ == "__main__":
    exit_process(main())
