"""The fault suite's short form (`benchmarks/faults.py --quick`): its goals hold on every run.

The full suite (`make faults`) runs 100 turns under kill -9, 14 personas x 20 concurrent turns and 240
malformed files; here each part runs at a smaller size (60 malformed files), with the same checks.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.server


def _faults() -> Any:
    spec = importlib.util.spec_from_file_location("faults", REPO / "benchmarks" / "faults.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["faults"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); the suite speaks its audio inputs")
    faults = _faults()
    return faults.run(faults.parse(["--quick", "--personas", "8"]))  # type: ignore[no-any-return]


def test_kill_minus_nine_never_corrupts_a_room(figures: dict[str, Any]) -> None:
    kill = figures["kill"]
    assert kill["problems"] == []
    assert kill["corrupted_histories"] == 0
    assert kill["unexpected_errors"] == 0
    assert kill["failed_left_room_unchanged"] == kill["failed"]
    assert kill["succeeded"] + kill["failed"] == kill["turns"]
    assert kill["kills"] >= 1  # the seed kills the server at least once in the short form
    assert kill["succeeded_after_restart"] >= 1


def test_concurrent_turns_land_in_their_own_rooms(figures: dict[str, Any]) -> None:
    concurrent = figures["concurrent"]
    assert concurrent["problems"] == []
    assert concurrent["wrong_room_or_persona"] == 0
    assert concurrent["lost_turns"] == 0
    assert concurrent["inconsistent_slots"] == 0
    assert sum(concurrent["kv_sources"].values()) == concurrent["turns"]


def test_every_malformed_file_gets_a_file_line_error(figures: dict[str, Any]) -> None:
    recipes = figures["recipes"]
    assert recipes["problems"] == []
    assert recipes["tracebacks"] == 0
    assert recipes["malformed"] == recipes["target"]  # distinct files, each malformed
    assert recipes["malformed_accepted"] == 0
    assert recipes["rejected_with_file_line"] == recipes["rejected"] == recipes["malformed"]
    assert recipes["valid_rejected"] == 0
    # the mutations that left a valid file are counted apart, and are few: the generator aims at the schema
    assert recipes["generated"] == recipes["malformed"] + recipes["valid_after_all"] + recipes["valid_rejected"]
    assert recipes["valid_after_all"] <= 0.2 * recipes["generated"]
    assert recipes["cli_clean"] == recipes["cli_checked"] >= 1


def test_bad_audio_and_images_are_refused_and_the_room_is_untouched(figures: dict[str, Any]) -> None:
    media = figures["media"]
    assert media["problems"] == []
    assert media["tracebacks"] == 0
    assert media["accepted_inputs"] == []
    assert media["refused_cleanly"] == media["inputs"] >= 40
    assert media["history_untouched"] == media["inputs"]
