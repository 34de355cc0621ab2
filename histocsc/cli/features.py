"""`histocsc features`: per-tile encoder features of a prepared cohort, one HDF5 file a case."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histocsc.cli.app import app, user_errors


@app.command("features")
@user_errors
def features_command(
    data: Annotated[Path, typer.Option("--data", help="Prepared cohort folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder of the HDF5 files (one a case).")],
    encoder: Annotated[
        str | None, typer.Option("--encoder", help="Encoder preset or timm:<architecture> "
                                 "(model.backbone; default: the config's).")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local weights file (model.weights_path).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Training config whose model section to use.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set model.backbone_kwargs="
                     "'{depth: 2}'."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Tiles per batch.")] = 32,
) -> None:
    """Encode every tile of a prepared cohort (CLAM / TRIDENT layout: features, coords); reruns
    keep files that are still valid and recompute those whose encoder, weights or tiles changed."""
    from histocsc.cohort import read_cohort
    from histocsc.config import parse_overrides
    from histocsc.learn.config import load_train_config
    from histocsc.learn.features import cache_cohort
    from histocsc.progress import progress_bar

    values = parse_overrides(overrides or [])
    if encoder is not None:
        values["model.backbone"] = encoder
    if weights is not None:
        values["model.weights_path"] = str(weights)
    cfg = load_train_config(config, values)
    cases = [c.case for c in read_cohort(data / "cohort.csv").cases]
    results = cache_cohort(cfg.model, data, out, cases, device, batch, progress_bar)
    computed = [r for r in results if r.computed]
    for r in results:
        typer.echo(f"{r.case}: {r.tiles} tiles, " + (f"computed ({r.reason})" if r.computed
                                                      else "up to date, kept"))
    seconds = sum(r.seconds for r in computed)
    tiles = sum(r.tiles for r in computed)
    rate = f", {tiles / seconds:,.1f} tiles/s" if seconds > 0 else ""
    typer.echo(f"features in {out}: {len(computed)} case(s) computed, "
               f"{len(results) - len(computed)} kept{rate}")


class EmbeddingSink:
    """`infer --features`: keeps each slide's embeddings (the graph's `embeddings` output, run
    with the probabilities) and writes them beside its outputs as features.h5, in the cache's
    layout (coords from scores.csv, the same tiles in the same order)."""

    FILE = "features.h5"

    def __init__(self) -> None:
        self.current = ""
        self.parts: dict[str, list[object]] = {}

    def engine(self, model: Path, device: str) -> object:
        """An Engine whose predict also collects the embeddings."""
        from histocsc.errors import ModelError
        from histocsc.learn.metadata import EMBEDDINGS, INPUT, OUTPUT
        from histocsc.predict.engine import Engine
        from histocsc.predict.model_check import check_batch

        sink = self

        class _Engine(Engine):
            def predict(self, tiles):  # type: ignore[no-untyped-def]
                probs, emb = self.session.run([OUTPUT, EMBEDDINGS], {INPUT: tiles})
                check_batch(probs, self.path, self.markers)
                sink.parts.setdefault(sink.current, []).append(emb)
                return probs

        engine = _Engine(model, device=device)
        if EMBEDDINGS not in [o.name for o in engine.session.get_outputs()]:
            raise ModelError(f"{model}: no {EMBEDDINGS!r} output; export the model with "
                             "`histocsc export --embeddings` for --features")
        return engine

    def progress(self, factory: object) -> object:
        """Wrap a progress factory: its call at each slide's start names the slide."""
        def start(name: str, total: int) -> object:
            self.current = name
            self.parts[name] = []
            return factory(name, total)  # type: ignore[operator]

        return start

    def write(self, engine: object, out: Path, done: list[Path]) -> list[Path]:
        """features.h5 for each finished slide; returns the files written."""
        import csv

        import numpy as np

        from histocsc.errors import DataError
        from histocsc.learn.feature_cache import write_features

        meta = engine.meta  # type: ignore[attr-defined]
        written = []
        for path in done:
            folder = out / path.stem
            with (folder / "scores.csv").open(newline="") as f:
                coords = np.array([(int(r["x"]), int(r["y"])) for r in csv.DictReader(f)],
                                  np.int64).reshape(-1, 2)
            parts = self.parts.get(path.name, [])
            emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
            if len(emb) != len(coords):
                raise DataError(f"{folder}: {len(emb)} embeddings for {len(coords)} tiles")
            enc = meta.get("encoder") or {}
            write_features(folder / self.FILE, emb, coords, {
                "encoder": str(enc.get("name", meta.get("backbone", ""))),
                "weights_checksum": str(meta.get("weights_checksum", "")),
                "tile_px": int(meta["tile_px"]), "mpp": float(meta["mpp"]),
                "histocsc_version": str(meta.get("histocsc_version", "")),
                "model_checksum": str(engine.checksum)})  # type: ignore[attr-defined]
            written.append(folder / self.FILE)
        return written
