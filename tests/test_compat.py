"""What was written before a change still works after it: a checkpoint and run config committed
from an earlier version of the code (tests/assets/run_v1, made by tests/assets/make_assets.py at
commit a28e316) resume with today's code and continue that version's own loss curve."""
import json
import shutil
import sys

import pytest

from tests.helpers import ASSETS, losses, ok, run_cmd


def _column(run, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.slow
def test_checkpoint_of_an_earlier_version_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ASSETS / "run_v1", run)
    recorded = losses(ASSETS / "run_v1")  # the earlier version's uninterrupted steps 1..4
    (run / "metrics.jsonl").write_text("")  # keep only what today's code logs
    proc = run_cmd([sys.executable, "-m", "pretrain.train", "--config", str(run / "config.yaml"), f"output_dir={run}"])
    out = ok(proc)
    assert "at step 2" in out, out[-2000:]
    resumed = losses(run)
    assert sorted(resumed) == [3, 4], resumed
    for step in (3, 4):
        assert resumed[step] == pytest.approx(recorded[step], rel=1e-5, abs=1e-6), (step, resumed, recorded)
    # the logged learning rate is the one each step used (that version logged the next step's)
    old_lr, new_lr = _column(ASSETS / "run_v1", "lr"), _column(run, "lr")
    assert new_lr[3] == pytest.approx(old_lr[2]) and new_lr[4] == pytest.approx(old_lr[3]), (old_lr, new_lr)
    assert (run / "checkpoints" / "step000004" / "COMPLETE").is_file()
