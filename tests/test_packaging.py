"""What `pip install .` gives a user: the model card's configs travel in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_resolves_the_model_card_names_outside_the_checkout(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("fastsiam-*.whl"))
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fastsiam/configs/")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import fastsiam, sys; assert fastsiam.__file__.startswith(sys.argv[1]), fastsiam.__file__; "
            "from fastsiam.flops import model_info; "
            "print(model_info('resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k')['params_m'])")
    # PYTHONPATH puts the installed wheel before the checkout's editable install
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == pytest.approx(25.557, abs=1e-3)  # ResNet-50 + a 1000-class head
