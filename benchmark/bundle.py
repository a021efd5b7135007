"""Rebuild the bundled upstreams (``upstreams/bundled``) and their cards (maintainers; run by hand).

    python -m speechbench.benchmark.bundle --work ckpts/bundle [--families apc,cpc,wav2vec2,hubert] [--install]

For each family this runs ``bench pretrain`` with the family's shipped recipe on the synthetic corpus (HuBERT: both
iterations, the second clustering the first one's hidden layer) and the same command with ``train.max_steps=0``
for the random-initialised twin (same architecture and seed, no update). Work directories are resumable. With
``--install`` the exported upstreams are copied into ``upstreams/bundled/<family>-synth[-random]`` with weights
stored as float16 (to keep the package small), and a card ``upstreams/cards/<name>.yaml`` records the exact
command, recipe, data, seed, steps and the sha256 of the shipped weights. The cards' cost fields (``params_m``,
``gflops_per_s``) are then filled by ``python tests/benchmarks/card_costs.py --write``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from speechbench.common import sha256_file
from speechbench.upstreams.families import get_family, pretrain_families
from speechbench.upstreams.registry import BUNDLED_DIR, CARDS_DIR


def _runs(family: str) -> list[tuple[str | None, list[str]]]:
    """``(bundled name or None, bench pretrain arguments)`` in order; ``{w}`` stands for the work directory."""
    if family == "hubert":
        iteration2 = ["--model", "hubert", "--iteration", "2", "--from", "{w}/hubert-iter1/upstream"]
        return [(None, ["--model", "hubert", "--out", "{w}/hubert-iter1"]),
                ("hubert-synth", [*iteration2, "--out", "{w}/hubert-synth"]),
                ("hubert-synth-random", [*iteration2, "--out", "{w}/hubert-synth-random", "train.max_steps=0"])]
    return [(f"{family}-synth", ["--model", family, "--out", f"{{w}}/{family}-synth"]),
            (f"{family}-synth-random", ["--model", family, "--out", f"{{w}}/{family}-synth-random",
                                        "train.max_steps=0"])]


def build(family: str, work: Path) -> dict[str, tuple[Path, str]]:
    """Pretrain ``family`` and its random twin into ``work``: ``{bundled name: (upstream dir, command)}``.

    The command recorded for a card uses ``ckpts`` as the work directory and includes the runs it depends on.
    """
    out, commands = {}, []
    for name, template in _runs(family):
        args = [a.replace("{w}", str(work)) for a in template]
        print("$", shlex.join(["bench", "pretrain", *args]), flush=True)
        subprocess.run([sys.executable, "-m", "speechbench", "pretrain", *args], check=True)
        command = shlex.join(["bench", "pretrain", *[a.replace("{w}", "ckpts") for a in template]])
        if name is None:
            commands.append(command)
            continue
        out[name] = (Path(args[args.index("--out") + 1]) / "upstream", " && ".join([*commands, command]))
    return out


def _half_precision(directory: Path) -> None:
    """Store the weights as float16 (they load back into float32 modules); halves the package size."""
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})


def install(name: str, family: str, upstream: Path, command: str) -> Path:
    """Copy an exported upstream into ``upstreams/bundled/<name>`` and write its card."""
    target = BUNDLED_DIR / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(upstream, target)
    _half_precision(target)
    target.chmod(0o755)
    for path in target.iterdir():
        path.chmod(0o644)  # the exported files are private temporaries; package data is world-readable
    meta = json.loads((target / "speechbench.json").read_text())
    info = meta.get("pretraining", {})
    random = name.endswith("-random")
    title = get_family(family).title
    description = (f"{title}, tiny, random initialisation (same architecture and seed as {name[:-7]}, no "
                   f"training): the floor for {name[:-7]}" if random else
                   f"{title}, tiny, pretrained by bench pretrain on the synthetic corpus (smoke-test "
                   f"upstream, not a published model)")
    card = {"name": name, "family": family, "description": description, "source": f"bundled:{name}",
            "license": "Apache-2.0 (trained by speechbench)", "sha256": sha256_file(target / "model.safetensors"),
            "recipe": info.get("recipe"), "command": command, "data": info.get("data"),
            "seed": info.get("seed"), "steps": meta.get("step")}
    (CARDS_DIR / f"{name}.yaml").write_text(yaml.safe_dump(card, sort_keys=False, width=1000))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="work directory for the pretraining runs (resumable)")
    parser.add_argument("--families", default=",".join(pretrain_families()))
    parser.add_argument("--install", action="store_true", help="copy into upstreams/bundled and write the cards")
    args = parser.parse_args()
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        for name, (upstream, command) in build(family, Path(args.work)).items():
            print(f"{name}: {upstream}")
            if args.install:
                print(f"  installed {install(name, family, upstream, command)}")


if __name__ == "__main__":
    main()
