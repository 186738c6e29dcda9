"""The README's main job, ``python -m fx_bk.demo``, at tiny sizes: it trains with
``fx_bk.PrivacyEngine``, reports a finite epsilon, writes the plot, and ``--compare`` prints the
step-time ratios against non-private training and Opacus ghost clipping."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fx_bk import demo

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "6", "--warmup", "2", "--batch-size", "16", "--n-train", "128",
        "--n-test", "32", "--seq-len", "8", "--d-model", "16", "--n-layers", "1",
        "--log-every", "3", "--no-progress"]


def _epsilon_line(out: str) -> float:
    m = re.search(r"held-out accuracy [0-9.]+ .*\| epsilon ([0-9.]+) at delta 1e-05", out)
    assert m, out
    return float(m.group(1))


def test_demo_eager_compare(tmp_path, capsys):
    png = tmp_path / "demo.png"
    res = demo.main([*TINY, "--no-compile", "--compare", "--plot", str(png)])
    out = capsys.readouterr().out
    eps = _epsilon_line(out)
    assert math.isfinite(eps) and eps > 0
    assert res["epsilon"] == pytest.approx(eps, abs=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("non-private eager", "Opacus ghost eager"):
        m = re.search(rf"^fx_bk eager / {name}: ([0-9.]+)x step time", out, re.M)
        assert m, out
        assert float(m.group(1)) > 0
    assert re.search(r"^\| Opacus ghost eager \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$",
                     out, re.M), out
    # Same batches, same noise seed, same accountant: Opacus ends where fx_bk does.
    assert res["variants"]["Opacus ghost eager"]["epsilon"] == pytest.approx(eps, abs=1e-3)
    m = re.search(r"max \|parameter difference\| after 6 steps ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) < 1e-4, out


def test_demo_compiled_target_epsilon(tmp_path, capsys):
    png = tmp_path / "demo.png"
    res = demo.main([*TINY, "--target-epsilon", "4", "--plot", str(png)])
    out = capsys.readouterr().out
    eps = _epsilon_line(out)
    assert "compile=True" in out and "fx_bk compiled" in out
    assert 0 < eps <= 4 + 1e-2 and math.isfinite(res["epsilon"])
    assert res["sigma"] > 0
    assert png.stat().st_size > 1000


def test_demo_main_path_needs_no_checkout_and_compare_says_so(tmp_path):
    """Outside the repository: the demo trains without importing ``benchmarks``; ``--compare``
    (which uses ``benchmarks/variants.py``) stops with an error naming the repository root."""
    code = f"""
import sys
from fx_bk import demo
argv = {[*TINY, "--no-compile", "--plot", ""]!r}
demo.main(argv)
print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] == "benchmarks"))
try:
    demo.main([*argv, "--compare"])
except RuntimeError as e:
    print("ERROR", e)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout
    m = re.search(r"^ERROR (.*)$", proc.stdout, re.M)
    assert m and "benchmarks/variants.py" in m.group(1) and "root" in m.group(1), proc.stdout


def test_readme_demo_command_matches_pyproject():
    """The README's main job installs the ``demo`` extra, its language-model demo the ``lm``
    extra; CI's ``test`` extra includes both."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    readme = (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    cmd = next(b for b in re.findall(r"```bash\n(.*?)\n```", readme, re.S)
               if "python -m fx_bk.demo" in b)
    assert 'pip install -e ".[demo]"' in cmd
    assert {"tqdm", "matplotlib"} <= {re.split(r"[=<>\[ ]", r)[0] for r in extras["demo"]}
    assert "fx_bk[lm]" in extras["test"] and "fx_bk[demo]" in extras["lm"]
    lm = next(b for b in re.findall(r"```bash\n(.*?)\n```", readme, re.S) if "--task lm" in b)
    assert 'pip install -e ".[lm]"' in lm
    assert {"transformers", "peft", "accelerate"} <= {re.split(r"[=<>\[ ]", r)[0]
                                                      for r in extras["lm"]}


def test_demo_language_model_task(tmp_path, capsys):
    """``--task lm``: DP LoRA fine-tuning through ``DPTrainer`` on text of varying length; the
    perplexity of held-out private text falls, epsilon is reported, one symbolic BK trace
    serves every length after the first."""
    png = tmp_path / "lm.png"
    res = demo.main(["--task", "lm", "--steps", "8", "--batch-size", "32", "--n-train", "256",
                     "--n-test", "32", "--pretrain-steps", "30", "--d-model", "32",
                     "--n-layers", "1", "--max-len", "24", "--no-progress", "--plot", str(png)])
    out = capsys.readouterr().out
    assert re.search(r"perplexity of held-out private text: [0-9.]+ before, [0-9.]+ after", out)
    assert res["perplexity_after"] < res["perplexity_before"]
    assert res["floor"] < res["perplexity_after"]
    assert 0 < res["epsilon"] <= 8 + 1e-2 and res["sigma"] > 0
    assert res["traces"] <= 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_user_level_with_audit(capsys):
    """``--user-level K`` trains with users of K examples as the privacy unit (the accountant
    then counts users: q = users per step / users); ``--audit`` audits the same noise, sampling
    rate and steps with canaries, and the audited bound stays below the accountant's epsilon."""
    res = demo.main([*TINY, "--no-compile", "--user-level", "4", "--audit", "--plot", ""])
    out = capsys.readouterr().out
    assert "audit: accountant epsilon" in out and "audited lower bound" in out
    assert 0.0 <= res["audit_lower_bound"] <= res["epsilon"]
