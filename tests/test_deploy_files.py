"""docker-compose.yaml and docs/deploy.md: no Docker engine here, so every file and variable they
refer to is checked instead, and the compose environment must be a valid relay configuration."""

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import relay_plugin

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
RELAY_NAMES = {"RELAY_" + v.name for v in relay_plugin.VARIABLES}
#: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def resolve(value) -> str:
    """A compose value as `docker compose` would see it with none of the host variables set."""
    def substitute(match):
        _, kind, rest = match.groups()
        return rest if kind in (":-", "-") else f"<{match.group(1)}>"

    return INTERPOLATION.sub(substitute, str(value))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def instances(compose) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if str(s.get("image", "")).startswith("ghcr.io/berriai/litellm")}


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of each bind mount (``./file:/target[:ro]``)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            found[target] = (COMPOSE.parent / source).resolve()
    return found


def config_of(service: dict) -> tuple[str, dict]:
    command = service["command"]
    target = command[command.index("--config") + 1]
    return target, yaml.safe_load(mounts(service)[target].read_text())


def environment(service: dict) -> dict[str, str]:
    return {k: resolve(v) for k, v in service["environment"].items()}


def test_the_compose_file_runs_several_litellm_instances_of_the_pinned_version(instances):
    assert len(instances) >= 2
    pinned = re.search(r"^litellm(?:\[proxy\])?==([\d.]+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    for service in instances.values():
        assert service["image"].endswith(f"v{pinned}") or f"v{pinned}-" in service["image"]


def test_every_file_it_mounts_exists_and_the_plugin_sits_next_to_the_config(instances):
    for service in instances.values():
        found = mounts(service)
        assert all(path.is_file() for path in found.values()), found
        config_target, config = config_of(service)
        assert found["/app/relay_plugin.py"] == ROOT / "relay_plugin.py"
        assert Path(config_target).parent == Path("/app")
        assert config["litellm_settings"]["callbacks"] == "relay_plugin.proxy_handler_instance"


def test_it_sets_only_real_relay_variables(compose):
    named = set()
    for service in compose["services"].values():
        named |= {k for k in service.get("environment", {}) if k.startswith("RELAY_")}
    named |= {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m.group(1).startswith("RELAY_")}
    assert named and named <= RELAY_NAMES, named - RELAY_NAMES


def test_every_variable_the_mounted_config_reads_is_set(instances):
    for service in instances.values():
        _, config = config_of(service)
        wanted = set(re.findall(r"os\.environ/(\w+)", yaml.safe_dump(config)))
        assert wanted and wanted <= set(service["environment"]), wanted - set(service["environment"])


def test_its_environment_is_a_valid_relay_configuration_with_redis_state(compose, instances):
    for service in instances.values():
        env = environment(service)
        config = relay_plugin.RelayConfig.from_env(env)
        target = relay_plugin.redis_target_of(config, {})
        hosts = [urlsplit(target.url).hostname] if target.topology == "single" else [h for h, _ in target.nodes]
        assert hosts and set(hosts) <= set(compose["services"])  # the Redis of this compose file
        profiles = set(service.get("profiles", []))
        assert all(set(compose["services"][h].get("profiles", [])) == profiles for h in hosts)  # started together
        _, proxy_config = config_of(service)
        names = {m["model_name"] for m in proxy_config["model_list"]}
        assert {config.plan.secondary_model, config.plan.escalate_model, *config.plan.consensus_models} <= names
        assert any(re.fullmatch(g.replace("*", ".*"), n) for g in config.apply_to for n in names)


def test_all_instances_of_a_profile_share_one_redis_and_one_prefix_as_the_two_instance_test_does(instances):
    by_profile: dict[tuple, set] = {}
    for s in instances.values():
        env = environment(s)
        by_profile.setdefault(tuple(s.get("profiles", [])), set()).add(
            (env["RELAY_REDIS_URL"], env.get("RELAY_REDIS_CLUSTER_NODES"), env["RELAY_REDIS_PREFIX"]))
    assert set(by_profile) == {(), ("cluster",)}
    for profile, shared in by_profile.items():
        instances_of_profile = [s for s in instances.values() if tuple(s.get("profiles", [])) == profile]
        assert len(shared) == 1 and len(instances_of_profile) >= 2, profile
    workers = [s["command"][s["command"].index("--num_workers") + 1] for s in instances.values()]
    assert all(int(w) >= 2 for w in workers)  # several workers too: the other half of the problem


def test_the_cluster_profile_is_a_redis_cluster_of_three_masters_with_a_replica_each(compose, instances):
    services = compose["services"]
    nodes = {
        name: s
        for name, s in services.items()
        if s.get("profiles") == ["cluster"] and "--cluster-enabled" in s.get("command", [])
    }
    assert len(nodes) == 6
    for node in nodes.values():
        command = node["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes" and "noeviction" in command
    init = services["redis-cluster-init"]
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script and all(n in script for n in nodes)
    assert set(init["depends_on"]) == set(nodes)
    clustered = [s for s in instances.values() if s.get("profiles") == ["cluster"]]
    for service in clustered:
        target = relay_plugin.redis_target_of(relay_plugin.RelayConfig.from_env(environment(service)), {})
        assert target.topology == "cluster" and {h for h, _ in target.nodes} == set(nodes)
        assert service["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
        assert "redis" not in service["depends_on"]  # the single Redis is not needed


def test_it_has_redis_and_ollama_and_every_dependency_is_a_service(compose, instances):
    services = compose["services"]
    images = {name: str(s.get("image", "")) for name, s in services.items()}
    assert any(i.startswith("redis") for i in images.values()) and any(i.startswith("ollama/ollama") for i in images.values())
    for service in services.values():
        assert set(service.get("depends_on", {})) <= set(services)
    for service in instances.values():
        assert urlsplit(environment(service)["OLLAMA_API_BASE"]).hostname in services
    pulled = {s["entrypoint"][-1] for s in services.values() if s.get("entrypoint", [])[:2] == ["ollama", "pull"]}
    _, config = config_of(next(iter(instances.values())))
    ollama_models = {m["litellm_params"]["model"].split("/", 1)[1] for m in config["model_list"]
                     if m["litellm_params"]["model"].startswith(("ollama/", "ollama_chat/"))}
    assert ollama_models <= pulled


def test_the_deployment_guide_names_only_real_variables_and_files():
    text = DEPLOY_DOC.read_text()
    assert set(re.findall(r"RELAY_[A-Z_]+[A-Z]", text)) <= RELAY_NAMES
    for path in re.findall(r"`((?:tests|docs)/[\w./]+|[\w-]+\.(?:yaml|py|lock))`", text):
        assert (ROOT / path).exists(), path


def test_the_deployment_guide_explains_every_variable_the_compose_file_reads_from_the_shell():
    text = DEPLOY_DOC.read_text()
    for name in {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}:
        assert f"`{name}`" in text, name
