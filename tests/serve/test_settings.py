"""Settings, command line, model URIs and the deployment files of the endpoint (no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import ray
import yaml

from segplatform.cli import build_parser
from segplatform.cli.serve import settings_from_args
from segplatform.serve.model import parse_model_uri
from segplatform.serve.runner import ServeRunError, resolve_address
from segplatform.serve.settings import ServeSettings, SettingsError, api_key_digest
from tests.serve.conftest import ROOT

DEPLOY = ROOT / "deploy"


def test_settings_defaults_and_deployment_options() -> None:
    settings = ServeSettings(model="models:/unet@champion")
    options = settings.deployment_options()
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == (
        settings.max_uploads + settings.max_inflight + settings.ongoing_headroom
    )
    assert options["backpressure_config"] == {"retry_after_s": 1}
    assert options["user_config"]["model"] == "models:/unet@champion"
    assert "num_replicas" not in options["user_config"]
    scaled = ServeSettings(model="x", autoscaling={"max_replicas": 3}).deployment_options()
    assert scaled["autoscaling_config"]["max_replicas"] == 3
    assert scaled["autoscaling_config"]["min_replicas"] == 1  # the documented default
    assert "num_replicas" not in scaled


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": ""}, "model"),
        ({"model": "x", "max_inflight": 0}, "max_inflight"),
        ({"model": "x", "max_uploads": 0}, "max_uploads"),
        ({"model": "x", "body_timeout_s": 0}, "body_timeout_s"),
        ({"model": "x", "autoscaling": {"max_replica": 2}}, "unknown field"),
        ({"model": "x", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"model": "x", "api_key_sha256": "secret"}, "api_key_sha256"),
        ({"model": "x", "no_such_setting": 1}, "unknown setting"),
    ],
)
def test_settings_refused(fields: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ServeSettings.from_dict(fields)


def test_model_uris() -> None:
    alias = parse_model_uri("models:/unet@champion")
    assert (alias.name, alias.alias, alias.version, alias.follows_alias) == (
        "unet",
        "champion",
        None,
        True,
    )
    version = parse_model_uri("models:/unet/3")
    assert (version.name, version.version, version.follows_alias) == ("unet", "3", False)
    assert parse_model_uri("s3://bucket/models/unet/").name == "unet"
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        parse_model_uri("models:/unet/3/extra")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_command_line_to_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    args = _args(
        "--model",
        "models:/unet@champion",
        "--autoscale",
        "1:3",
        "--batching",
        "off",
        "--api-key-env",
        "MY_KEY",
        "--set",
        "max_batch_size=4",
        "--set",
        'autoscaling={"look_back_period_s": 2}',
    )
    settings, key = settings_from_args(args)
    assert key == "s3cret" and settings.api_key_sha256 == api_key_digest("s3cret")
    assert settings.autoscaling["max_replicas"] == 3
    assert settings.autoscaling["look_back_period_s"] == 2
    assert settings.autoscaling["upscale_delay_s"] == 5.0  # from --upscale-delay's default
    assert settings.batching is False and settings.max_batch_size == 4
    assert settings.tracking_uri == "http://127.0.0.1:5000"
    assert args.host == "127.0.0.1"  # loopback unless told otherwise
    with pytest.raises(SystemExit):
        _args("--model", "x", "--autoscale", "3:1")


def test_serve_and_export_have_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "export"):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([command, "--help"])
        assert done.value.code == 0
        assert f"segplatform {command} --model" in capsys.readouterr().out


def test_ray_address_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("SEGPLATFORM_HOME", str(tmp_path))  # no platform there
    assert resolve_address(None) is None
    assert resolve_address("127.0.0.1:6379") == "127.0.0.1:6379"
    with pytest.raises(ServeRunError, match="dashboard URL"):
        resolve_address("http://127.0.0.1:8265")


def _serve_config(text: str) -> dict:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    return config


def test_serve_yaml_is_a_valid_serve_config_for_the_builder() -> None:
    from segplatform.serve.app import build_app

    config = _serve_config((DEPLOY / "serve.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    assert app["import_path"] == "segplatform.serve.app:build_app"
    assert app["args"]["model"].startswith("models:/") and app["args"]["model"].endswith(
        "@champion"
    )
    build_app(app["args"])  # every args key is a setting


def test_rayservice_manifest() -> None:
    from segplatform.serve.app import build_app

    manifest = yaml.safe_load((DEPLOY / "rayservice-segplatform.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    config = _serve_config(manifest["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    build_app(app["args"])
    # Exposed beyond the pod: the replicas need the key, from a secret, in their environment.
    assert config["http_options"]["host"] == "0.0.0.0" and app["args"]["api_key_env"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    rayjob = yaml.safe_load((DEPLOY / "rayjob-refinenet.yaml").read_text())
    job_image = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][
        0
    ]["image"]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == job_image
            names = {entry["name"]: entry for entry in container["env"]}
            assert "secretKeyRef" in names[app["args"]["api_key_env"]]["valueFrom"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
