"""The README stays true: its config reference is generated from the code, and every command it
shows is run by a test or by the quickstart with the flags the README uses."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Each command the README shows -> (the files whose code runs it, what in them runs it). The tools/ scripts are
# thin wrappers over a module's main(argv), which the tests call with the same arguments. A README command
# without an entry here, or with a flag none of its files passes, fails the test below.
EXERCISED_BY = {
    "pip install": ([".ci/run"], "pip install -e '.[test]'"),
    "pytest": ([".ci/run"], "&& pytest"),
    "mmscale quickstart": (["tests/test_quickstart.py"], '"quickstart"'),
    "spark-submit": (["tests/test_make_shards_cluster.py"], '"spark-submit"'),
    "ray job submit": (["tests/test_make_shards_cluster.py"], 'ray_command("job", "submit"'),
    "tools/make_shards.py": (["tests/test_make_shards.py", "tests/test_make_shards_urls.py", "tests/corpus.py",
                              "tests/test_vqa_shards.py"],
                             "from mmscale.shards.make_shards import main"),
    "tools/inspect_shards.py": (["tests/test_inspect_shards.py", "tests/test_vqa_shards.py"],
                                "from mmscale.shards.inspection import main"),
    "tools/train_tokenizer.py": (["tests/test_tokenizer_train.py"], "from mmscale.shards.tokenizer_train import"),
    "mmscale data-check": (["tests/test_cli.py"], '"data-check"'),
    "launch/pretrain.sh": (["tests/test_train.py"], 'run_launch_script("pretrain.sh"'),
    "deepspeed": (["tests/test_train.py", "mmscale/quickstart.py"], '"deepspeed.launcher.runner"'),
    "launch/multinode.sh": (["tests/test_train.py"], 'run_launch_script("multinode.sh"'),
    "launch/slurm.sbatch": (["tests/test_train.py"], 'run_launch_script("slurm.sbatch"'),
    "mmscale eval zeroshot": (["tests/test_train.py", "mmscale/quickstart.py"], '"zeroshot"'),
    "mmscale eval retrieval": (["tests/test_train.py", "mmscale/quickstart.py", "tests/test_fusion_eval.py"],
                               '"retrieval"'),
    "mmscale eval mlm": (["tests/test_fusion_eval.py"], '"mlm"'),
    "mmscale match": (["tests/test_fusion_eval.py"], '"match"'),
    "mmscale eval vqa": (["tests/test_vqa.py"], '"vqa"'),
    "mmscale vqa": (["tests/test_vqa.py"], '"vqa"'),
    "mmscale report": (["tests/test_cli.py"], '"report"'),
    "mmscale finetune": (["tests/test_finetune.py", "mmscale/quickstart.py", "tests/test_vqa.py"], '"finetune"'),
    "mmscale export": (["tests/test_finetune.py", "mmscale/quickstart.py", "tests/test_vqa.py"], '"export"'),
    "mmscale embed": (["tests/test_finetune.py"], '"embed"'),
    "mmscale prune": (["tests/test_prune.py"], '"prune"'),
    "mmscale convert": (["tests/test_released.py"], '"convert"'),
    "mmscale zeroshot": (["tests/test_finetune.py", "mmscale/quickstart.py"], '"zeroshot"'),
    "tools/bench/loader.py": (["tests/test_bench.py"], '"loader.py"'),
    "tools/bench/train_throughput.py": (["tests/test_bench.py"], '"train_throughput.py"'),
    "tools/bench/finetune_memory.py": (["tests/test_bench.py"], '"finetune_memory.py"'),
    "tools/bench/learning.py": (["tests/test_bench.py"], '"learning.py"'),
    "tools/bench/final_save.py": (["tests/test_bench.py"], '"final_save.py"'),
    "tools/bench/eval_scaling.py": (["tests/test_bench.py"], '"eval_scaling.py"'),
    "tools/bench/sharding.py": (["tests/test_bench.py"], '"sharding.py"'),
    "tools/bench/elastic_resume.py": (["tests/test_bench.py"], '"elastic_resume.py"'),
    "tools/bench/vqa.py": (["tests/test_bench.py"], '"vqa.py"'),
    "tools/gpu_check.sh": (["tests/test_bench.py"], '"gpu_check.sh"'),
}


def readme_commands() -> list[list[str]]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                for part in line.split("&&"):
                    commands.append(shlex.split(part))
    return commands


def command_name(words: list[str]) -> str:
    """`mmscale eval zeroshot`, `tools/make_shards.py`, `launch/slurm.sbatch`, `deepspeed`, ..."""
    if words[0] == "mmscale":
        return " ".join(words[:3] if words[1] == "eval" else words[:2])
    if words[0] in ("python", "sbatch", "bash"):
        return next(word for word in words[1:] if not word.startswith("-"))
    if words[0] == "pip":
        return "pip install"
    if words[:3] == ["ray", "job", "submit"]:
        return "ray job submit"
    return words[0]


def split_launcher(words: list[str]) -> tuple[list[str], list[str]]:
    """A cluster launcher's own words and the command it starts: `spark-submit [its flags] script.py ...`,
    `ray job submit [its flags] -- python script.py ...`; ([], words) for any other command."""
    if words[0] == "spark-submit":
        script = next(index for index, word in enumerate(words) if word.endswith(".py"))
        return words[:script], ["python", *words[script:]]
    if command_name(words) == "ray job submit":
        return words[:words.index("--")], words[words.index("--") + 1:]
    return [], words


def launcher_help(name: str) -> str | None:
    """The launcher's --help text; None where it cannot run here (spark-submit without Java)."""
    executable = Path(sys.executable).parent
    if name == "spark-submit":
        if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
            return None
        command = [str(executable / "spark-submit"), "--help"]
    else:
        command = [str(executable / "ray"), "job", "submit", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr  # spark-submit prints its usage on stderr


def test_the_config_reference_in_the_readme_is_current():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_readme_command_is_run_by_a_test_or_the_quickstart_with_its_flags():
    commands = readme_commands()
    assert len(commands) >= 25  # the parser found the blocks
    for words in commands:
        name = command_name(words)
        assert name in EXERCISED_BY, f"README command {' '.join(words)!r}: no test runs {name!r}"
        files, evidence = EXERCISED_BY[name]
        sources = "\n".join((REPO / path).read_text(encoding="utf-8") for path in files)
        assert evidence in sources, f"{name}: {evidence} not found in {files}"
        own = words[words.index(name) + 1:] if words[0] == "sbatch" else words  # sbatch's own flags are SLURM's
        for flag in (word.split("=")[0] for word in own if word.startswith("--")):
            assert flag in sources, f"README command {' '.join(words)!r}: {flag} is not used in {files}"


def _help(command: list[str]) -> str:
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow  # runs each script's --help (imports torch and DeepSpeed)
def test_every_readme_command_parses_with_the_real_parsers():
    """mmscale commands through the CLI's own parser; scripts' flags in their --help; every key=value
    override a config key."""
    from mmscale.cli import build_parser
    from mmscale.config import describe
    from mmscale.data.check import DataCheckConfig
    from mmscale.train.config import TrainRunConfig

    def script_of(name: str) -> list[str]:
        return ["-m", "deepspeed.launcher.runner"] if name == "deepspeed" else [name]

    commands = [split_launcher(words) for words in readme_commands()]
    scripts = {name for name in (command_name(words) for _, words in commands)
               if name.endswith(".py") or name == "deepspeed"}
    launchers = {command_name(launcher) for launcher, _ in commands if launcher}
    with ThreadPoolExecutor(4) as pool:  # each --help is a process start and imports: overlap them
        helps = dict(zip(scripts, pool.map(lambda name: _help(script_of(name)), scripts)))
        helps |= dict(zip(launchers, pool.map(launcher_help, launchers)))
    for launcher, words in commands:
        if launcher and helps[command_name(launcher)] is not None:  # the launcher's flags in its own --help
            for flag in (word.split("=")[0] for word in launcher if word.startswith("--")):
                assert flag in helps[command_name(launcher)], f"{' '.join(launcher)!r}: no {flag}"
        name = command_name(words)
        keys_of = DataCheckConfig if name == "mmscale data-check" else TrainRunConfig
        for word in words:
            if "=" in word and not word.startswith("-"):
                key = word.split("=")[0]
                assert key in {row[0] for row in describe(keys_of)}, f"{' '.join(words)!r}: no config key {key}"
        if words[0] == "mmscale":
            build_parser().parse_args(words[1:])  # exits (fails the test) on an unknown flag
        elif name.endswith(".py") or name == "deepspeed":
            own = words
            if name == "deepspeed":  # the launcher's flags, then mmscale train's after `--module mmscale.train`
                cut = words.index("--module") + 2
                own = words[:cut]
                build_parser().parse_args(["train", *words[cut:]])
            for flag in (word.split("=")[0] for word in own if word.startswith("--")):
                assert flag in helps[name], f"{' '.join(words)!r}: {name} has no {flag}"
