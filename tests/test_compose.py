"""docker-compose.yml (Docker does not run here): its structure, and that every command, path, build argument and
port it names exists: `revdeq` subcommands and their options, the Dockerfile's build argument and stages, the
image's working directory and cache variables, TensorBoard's flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

import click
import pytest
import typer
import yaml
from test_dockerfile import arg_defaults, dockerfile_instructions, stages

from revdeq_cli.cli.app import app

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
TRAIN_SERVICES = ("train", "train-cuda")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # safe_load resolves the `<<: *build` merges


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[tuple[str, str]]]:
    return stages(dockerfile_instructions((REPO / "Dockerfile").read_text(encoding="utf-8")))


def image_env(by_stage: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """The final stage's ENV variables and its last WORKDIR (the containers' working directory)."""
    env = {}
    for keyword, args in by_stage["final"]:
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))
        elif keyword == "WORKDIR":
            env["WORKDIR"] = args
    return env


def parse_revdeq(args: list[str]) -> click.Context:
    """Parse `revdeq ARGS` as the CLI would, without running it: unknown commands or options raise."""
    group = typer.main.get_command(app)
    name, *rest = args
    command = group.get_command(click.Context(group), name)
    assert command is not None, f"`revdeq {name}` is not a command"
    return command.make_context(name, rest)


def mounts(service: dict) -> dict[str, str]:
    """{container path: host path or volume name}."""
    return {target: source for source, target, *_ in (v.split(":") for v in service["volumes"])}


def test_services(compose):
    services = compose["services"]
    assert set(services) == {"train", "train-cuda", "tensorboard"}
    # `docker compose up` starts training and TensorBoard; the CUDA variant only when named.
    assert "profiles" not in services["train"] and "profiles" not in services["tensorboard"]
    assert services["train-cuda"]["profiles"] == ["cuda"]


def test_images_build_from_the_dockerfile_with_its_build_argument(compose, dockerfile):
    declared = arg_defaults(dockerfile[""])
    for name, service in compose["services"].items():
        build = service["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
        assert set(build["args"]) <= set(declared), f"{name}: build args the Dockerfile does not declare"
        base = build["args"]["BASE"]
        assert f"base-{base}" in dockerfile, f"{name}: BASE={base} names no stage of the Dockerfile"
        assert service["image"] == f"revdeq:{base}"  # one tag per variant: TensorBoard reuses train's image
    assert compose["services"]["train-cuda"]["build"]["args"]["BASE"] == "cuda"
    assert compose["services"]["train"]["build"]["args"]["BASE"] == declared["BASE"] == "cpu"


def test_train_services_run_revdeq_commands(compose, dockerfile):
    entrypoint = [a for k, a in dockerfile["final"] if k == "ENTRYPOINT"]
    assert entrypoint == ['["revdeq"]']
    for name in TRAIN_SERVICES:
        service = compose["services"][name]
        assert "entrypoint" not in service  # the image's `revdeq`
        assert service["command"][0] == "train"
        parse_revdeq(service["command"])
    ctx = parse_revdeq(compose["services"]["train-cuda"]["command"])
    assert ctx.params["device"] == "cuda"
    gpus = compose["services"]["train-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_commands_in_the_usage_comments_exist():
    """The header's `docker compose run --rm SERVICE ARGS` examples are real revdeq command lines."""
    text = COMPOSE.read_text(encoding="utf-8")
    examples = re.findall(r"docker compose run --rm (\S+) (.+?)(?:\s+#.*)?$", text, flags=re.M)
    assert examples
    services = yaml.safe_load(text)["services"]
    for service, args in examples:
        assert service in services
        parse_revdeq(shlex.split(args))
    for services_named in re.findall(r"docker compose up ([\w -]+?)\s*(?:#|$)", text, flags=re.M):
        assert set(services_named.split()) <= set(services)


def test_volumes_are_where_the_image_keeps_runs_and_caches(compose, dockerfile):
    from revdeq_cli.checkpoints import default_run_dir
    from revdeq_cli.checkpoints.layout import RUNS_DIR

    env = image_env(dockerfile)
    workdir = PurePosixPath(env["WORKDIR"])
    # Runs are written to, and generate looks in, runs/ under the working directory.
    assert default_run_dir("pydoc").parent == RUNS_DIR == Path("runs")
    runs = str(workdir / "runs")
    for name in TRAIN_SERVICES:
        volumes = mounts(compose["services"][name])
        assert volumes[runs] == "./runs"
        cache_target = next(t for t, s in volumes.items() if s == "cache")
        for variable in ("REVDEQ_CACHE_DIR", "HF_HOME"):
            assert PurePosixPath(cache_target) in PurePosixPath(env[variable]).parents, variable
    assert "cache" in compose["volumes"]
    assert "runs" in (REPO / ".dockerignore").read_text().split()  # the mounted runs are not baked into the image


def test_tensorboard_serves_the_mounted_runs_on_6006(compose):
    from tensorboard import program

    service = compose["services"]["tensorboard"]
    assert service["entrypoint"] == ["tensorboard"]
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^\s*"tensorboard[>=<~ ]', pyproject, flags=re.M), "the image must install tensorboard"
    board = program.TensorBoard()
    board.configure(argv=[None, *service["command"]])  # exits on a flag tensorboard does not know
    volumes = mounts(service)
    assert volumes[board.flags.logdir] == compose["services"]["train"]["volumes"][0].split(":")[0] == "./runs"
    assert board.flags.host == "0.0.0.0"  # reachable through the published port
    assert board.flags.port == 6006 and service["ports"] == ["6006:6006"]
