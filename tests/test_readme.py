"""The README's set-up commands are the ones CI runs, and its measured figures come from scripts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def setup_commands() -> list[str]:
    section = README[README.index("## Set up"):README.index("\n## ", README.index("## Set up") + 1)]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_two_setup_commands_and_ci_runs_the_second_as_written():
    demo, tests = setup_commands()
    assert demo.endswith("pytest --model demo --seeds 5)") and tests.endswith("HF_HUB_OFFLINE=1 pytest")
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_setup_installs_the_cpu_torch_that_the_constraints_keep():
    pins = [line for line in (ROOT / "ci" / "constraints-cpu.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins == ["torch==2.13.0"]
    for command in [*setup_commands(), (ROOT / "ci" / "vllm_cpu_tests.sh").read_text()]:
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in command
        assert "-c ci/constraints-cpu.txt" in command


def test_every_generated_block_names_a_script_that_exists_and_is_filled():
    blocks = re.findall(r"<!-- BEGIN ([\w-]+): python (ci/\S+\.py)[^>]*-->\n(.*?)<!-- END \1 -->", README, re.S)
    assert {name for name, _, _ in blocks} >= {"demo", "demo-timing", "paper-toy"}
    for name, script, body in blocks:
        assert (ROOT / script).is_file(), script
        assert body.strip(), f"README block {name} is empty: run {script} with --readme"
