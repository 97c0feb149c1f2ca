"""The champion rule with real training runs: ``run(..., register_as=NAME, promote="if_better")``.

Runs of the tiny U-Net compete on the shapes dataset through ``run()`` in Ray Train's local mode
(``num_workers=0``: the loop runs in this process), all registering into one MLflow SQLite store.
Each run registers its best checkpoint as a new version of one model; the alias ``champion``
moves to it only when its ``val_miou`` tag is at least the holder's on the same dataset (its URI,
manifest version and content revision). The scores come from the runs' own settings: one
iteration at a vanishing learning rate (an untrained network) against sixteen iterations of
AdamW; the same config and seed twice give the same score, since local-mode training is
deterministic.

What the registry holds is read back with ``MlflowClient``: the versions, where the alias points,
and the tags ``val_miou``, ``dataset``, ``manifest_version``, ``dataset_revision`` and
``promotion`` (why it moved or stayed) on each version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from segplatform.data.format import MANIFEST_NAME, MANIFEST_VERSION, DatasetError
from segplatform.train import TrainConfig, run

pytestmark = pytest.mark.slow

MODEL = "shapes-champion"
UNTRAINED = {"max_iters": 1, "lr": 1e-6}  # one step that barely moves the initial weights
TRAINED = {"max_iters": 16, "lr": 0.003}  # two epochs of the 16 training rows


def _versions(client, name: str) -> dict[int, object]:
    return {int(v.version): v for v in client.search_model_versions(f"name = '{name}'")}


def test_champion_moves_only_to_a_score_at_least_the_holders_on_the_same_data(
    ray_cluster: None,
    shapes_writer: Callable[..., object],
    storage: str,
    tmp_path: Path,
    tiny_unet: Callable[..., TrainConfig],
) -> None:
    from mlflow.tracking import MlflowClient

    shapes_dataset = str(tmp_path / "shapes")
    shapes_writer(shapes_dataset)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)

    def compete(name: str, data: str, settings: dict[str, float]) -> dict:
        config = tiny_unet(
            data=data,
            num_workers=0,
            optimizer="adamw",
            seed=0,
            log_every=4,
            storage_path=storage,
            name=name,
            mlflow_uri=tracking_uri,
            experiment="champion-tests",
            register_as=MODEL,
            promote="if_better",
            **settings,
        )
        return run(config).metrics

    def champion() -> int:
        return int(client.get_model_version_by_alias(MODEL, "champion").version)

    def score(version: int) -> float:
        return float(_versions(client, MODEL)[version].tags["val_miou"])

    # 1. The first registered version becomes champion whatever it scores.
    untrained = compete("untrained", shapes_dataset, UNTRAINED)
    assert champion() == 1
    first = _versions(client, MODEL)[1]
    assert first.tags["promotion"] == "first champion"
    assert first.tags["dataset"] == shapes_dataset
    assert first.tags["manifest_version"] == str(MANIFEST_VERSION)
    assert score(1) == pytest.approx(untrained["val_miou"])

    # 2. A better run takes the alias.
    trained = compete("trained", shapes_dataset, TRAINED)
    assert score(2) == pytest.approx(trained["val_miou"])
    assert score(2) > score(1) + 0.1
    assert champion() == 2
    assert _versions(client, MODEL)[2].tags["promotion"].startswith("val_miou ")

    # 3. The same config and seed again trains the same weights to the same score, and an equal
    #    score takes the alias (at least the holder's).
    again = compete("trained-again", shapes_dataset, TRAINED)
    assert again["param_checksum"] == trained["param_checksum"]
    assert (
        _versions(client, MODEL)[3].tags["val_miou"] == _versions(client, MODEL)[2].tags["val_miou"]
    )
    assert champion() == 3
    assert "of version 2" in _versions(client, MODEL)[3].tags["promotion"]

    # 4. A worse run is registered, but the alias stays; its version says why.
    compete("untrained-again", shapes_dataset, UNTRAINED)
    versions = _versions(client, MODEL)
    assert sorted(versions) == [1, 2, 3, 4]
    assert score(4) < score(3)
    assert champion() == 3
    reason = versions[4].tags["promotion"]
    assert "stays on version 3" in reason and "<" in reason

    # 5. A worse run on other data (a copy of the dataset at another URI) takes the alias: its
    #    score is not comparable with the holder's.
    other = str(tmp_path / "shapes-copy")
    shutil.copytree(shapes_dataset, other)
    compete("untrained-other-data", other, UNTRAINED)
    versions = _versions(client, MODEL)
    assert sorted(versions) == [1, 2, 3, 4, 5]
    assert versions[5].tags["dataset"] == other
    assert score(5) < score(3)
    assert champion() == 5
    assert "other data" in versions[5].tags["promotion"]

    # 6. A dataset whose manifest has another version is refused before training: nothing is
    #    registered and the alias stays.
    unknown = str(tmp_path / "shapes-v2")
    shutil.copytree(shapes_dataset, unknown)
    manifest = Path(unknown) / MANIFEST_NAME
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 2}))
    with pytest.raises(DatasetError, match="manifest version"):
        compete("unknown-manifest", unknown, TRAINED)
    assert sorted(_versions(client, MODEL)) == [1, 2, 3, 4, 5]
    assert champion() == 5

    # 7. The first dataset rewritten in place with other rows (fewer of them: a new revision at
    #    the same URI): a worse run on it takes the alias from a better one on the old rows.
    compete("trained-old-rows", shapes_dataset, TRAINED)
    assert champion() == 6
    old_revision = _versions(client, MODEL)[6].tags["dataset_revision"]
    shutil.rmtree(shapes_dataset)
    shapes_writer(shapes_dataset, train=12, val=4)
    compete("untrained-new-rows", shapes_dataset, UNTRAINED)
    versions = _versions(client, MODEL)
    assert versions[7].tags["dataset"] == versions[6].tags["dataset"] == shapes_dataset
    assert versions[7].tags["dataset_revision"] not in ("", old_revision)
    assert score(7) < score(6) and champion() == 7
    assert "other data" in versions[7].tags["promotion"]
