"""Re-measures the CPU figures the README's "Measured here" table states, each with the command that produces
it, on this machine. Prints a markdown table (what | figure | command).

    python benchmarks/figures.py [--skip-quickstart] [--suite]

- quickstart: README command 1, as written there, in a fresh clone of this checkout (venv, install, train,
  eval), timed as a whole; its eval line gives the test accuracy.
- the CPU smoke variants of the GPU configs (`:smoke`, `:tiny`): train wall time;
- the MNIST CNN (files not needed): ms/step from `bench` on its stand-in data, times the config's steps;
- `quantize` of the quickstart's run: accuracy before/after, bytes;
- `--suite`: README command 2's pytest line, timed (about a quarter of an hour).
Start-up costs per command (--help, eval, predict, no-op resume) come from benchmarks/startup.py.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_command(number: int) -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    return blocks[number - 1].strip()


def _timed(cmd, cwd=ROOT, shell=False) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, shell=shell, capture_output=True, text=True,
                          executable="/bin/bash" if shell else None)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd if shell else ' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-quickstart", action="store_true")
    p.add_argument("--suite", action="store_true")
    args = p.parse_args()
    cli = [sys.executable, "-m", "fastgpu_jax"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quickstart:
            clone = os.path.join(tmp, "clone")
            subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
            cmd = _readme_command(1)
            wall, out = _timed(cmd, cwd=clone, shell=True)
            result = _last_json(out)
            rows.append(("README command 1 (fresh clone: venv, install, train 400 steps, eval)",
                         f"{wall:.0f} s; test accuracy {result['accuracy']:.4f}", cmd))
            workdir = os.path.join(clone, "runs", "digits")
            wall, out = _timed(cli + ["quantize", "--workdir", workdir])
            q = _last_json(out)
            rows.append(("int8 quantization of that run", f"test acc. {q['float_accuracy']:.4f} -> "
                         f"{q['int8_accuracy']:.4f}, {q['float_bytes']:,} -> {q['int8_bytes']:,} bytes, "
                         f"{wall:.0f} s", "fastgpu-jax quantize --workdir runs/digits"))
        for config, what in (("configs/cifar10_vit_s4.py:smoke", "ViT-S/4 smoke run (3 steps, synthetic)"),
                             ("configs/imagenet_vit_b16_synthetic.py:tiny", "ViT-B/16 tiny run (3 steps)"),
                             ("configs/imagenet_resnet50_synthetic.py:tiny", "ResNet-50 tiny run")):
            workdir = os.path.join(tmp, config.replace("/", "_"))
            wall, _ = _timed(cli + ["train", "--config", config, "--workdir", workdir,
                                    "--config.log.progress_bar=False"])
            rows.append((what, f"{wall:.0f} s", f"fastgpu-jax train --config {config} --workdir W"))
        bench_json = os.path.join(tmp, "mnist_bench.json")
        _timed(cli + ["bench", "--config", "configs/mnist_cnn.py", "--steps", "30", "--devices", "1",
                      "--json", bench_json])
        ms = 1000 * json.load(open(bench_json))["rows"][0]["step_s"]
        rows.append(("MNIST CNN train step (batch 64, stand-in data)", f"{ms:.1f} ms/step, so 1,700 steps "
                     f"~{1700 * ms / 1000:.0f} s", "fastgpu-jax bench --config configs/mnist_cnn.py --steps 30"))
        if args.suite:
            cmd = _readme_command(2).split("&&")[-1].strip()
            wall, _ = _timed(cmd, shell=True)
            rows.append(("test suite (README command 2's pytest line)", f"{wall / 60:.1f} min", cmd))
    print(f"| what | measured ({os.cpu_count()} CPUs) | command |\n|---|---|---|")
    for what, figure, cmd in rows:
        print(f"| {what} | {figure} | `{cmd}` |")


if __name__ == "__main__":
    main()
