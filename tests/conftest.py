from __future__ import annotations

import os
from pathlib import Path

import pytest

from lung_models import registry
from lung_models.data import phantoms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect sets up its console logging at its first import, on whatever sys.stderr is then: first
# imported inside a CliRunner.invoke, it would keep the runner's stream, closed after the call, and
# every later log line of a flow would fail. Imported here, it writes to the session's stream.
import prefect.main  # noqa: E402,F401 - what sets up its logging (a bare "import prefect" is lazy)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNG_FACTORY_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """A test that uses ``factory`` or ``tuned_factory`` trains and exports every registered model
    (once a session): that is what the ``slow`` marker names, so ``-m "not slow"`` leaves it out.
    Under pytest-xdist (``-n 2 --dist loadgroup``, the README's test command) the tests of each
    fixture go to one worker, so each trains once and the two train side by side."""
    for item in items:
        uses = {"factory", "tuned_factory"} & set(getattr(item, "fixturenames", ()))
        if uses:
            item.add_marker(pytest.mark.slow)
        if len(uses) == 1:
            item.add_marker(pytest.mark.xdist_group(uses.pop()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample images beside the repo (../shared/data); tests that need them skip without."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (set LUNG_FACTORY_SHARED_DATA or "
                    "place shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def postgres_server():
    """The admin URL of a PostgreSQL server for this session: LUNG_TEST_POSTGRES_URL, or one the tests
    start from Debian's binaries. Without either, tests that need it skip saying why, except under CI
    (CI=true), where .ci/run installs the package and a missing server is a failure."""
    import pgserver

    url = os.environ.get("LUNG_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        server = pgserver.Server()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL ledger tests: {exc}")
        pytest.skip(str(exc))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh, empty database on the session's server, dropped after the test."""
    import uuid

    import pgserver

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield pgserver.create_database(postgres_server, name)
    pgserver.drop_database(postgres_server, name)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request):
    """Each ledger backend in turn: None (SQLite in the output folder), then a PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (a temporary API + SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Every data set, small, under one folder: the local source finds each layout below it.
TEST_DATA = {"lc25000": ({"size": 96, "classes": ["lung_n", "lung_aca", "lung_scc"]}, 16),
             "mosmed": ({"in_plane": 64, "slices": (30, 36)}, 10),
             "chest_ct": ({"size": 96}, 16),
             "ct_cancer": ({"size": 96}, 16)}


def small_input_shapes() -> dict[str, list[int]]:
    """Every registered model's small test input, by name, as the train flow takes it."""
    return {name: list(registry.get(name).spec.test_input_shape) for name in registry.names()}


def make_tiny_hub_module(path: Path) -> Path:
    """A SavedModel with the TF-Hub image feature-vector signature (float images in [0, 1] of any
    size → a feature vector), small enough to fine-tune in a test."""
    import tensorflow as tf

    class TinyFeatureVector(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 16], seed=[1, 2]) * 0.2, name="conv/kernel")
            self.bias = tf.Variable(tf.zeros([16]), name="conv/bias")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            y = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 2, "SAME") + self.bias)
            return tf.reduce_mean(y, axis=[1, 2])

    module = TinyFeatureVector()
    tf.saved_model.save(module, str(path))
    return path


@pytest.fixture(scope="session")
def factory(prefect_harness, tmp_path_factory):
    """Train and export every registered model once for the whole session (two epochs, each at the
    small ``test_input_shape`` of its spec: the documented architecture, only the input shrinks)."""
    from flows.train import train_models

    root = tmp_path_factory.mktemp("factory")
    for kind, (params, n) in TEST_DATA.items():
        phantoms.write_dataset(kind, root / "data" / kind, n, seed=7, **params)
    hub = make_tiny_hub_module(root / "tiny-hub-module")
    weights = {name: "random" for name in registry.names() if registry.get(name).spec.pretrained}
    weights["ct-inception-hub"] = str(hub)
    bundles = train_models(models=registry.names(), profile="full", source="local", data_dir=str(root / "data"),
                           exports_dir=str(root / "exports"), work_dir=str(root / "work"),
                           epochs=2, batch_size=4, input_shape=small_input_shapes(), weights=weights)
    # Two epochs on a few dozen images leave most models near chance, so most fail their promotion gate
    # and are exported without LATEST. What the export decided is kept for the tests of the gate; then
    # the rest are promoted by hand, as an operator would, so the scoring tests see every model.
    from lung_models import promotion

    exports = root / "exports"
    promoted_at_export = {name: promotion.promoted_version(exports / name) for name in bundles}
    for name, path in bundles.items():
        if promoted_at_export[name] is None:
            promotion.promote(exports, name, Path(path).name, force=True, reason="test fixture: scored by the tests")
    return {"root": root, "exports": exports, "bundles": bundles, "hub": hub,
            "promoted_at_export": promoted_at_export}


def save_random_notop_weights(factory_name: str, path: Path) -> Path:
    """A weights file in the layout keras.applications loads (``--weights /path/file``), from random
    weights: what a user's downloaded ImageNet file looks like to the code, without the download."""
    import keras

    getattr(keras.applications, factory_name)(include_top=False, weights=None).save_weights(path)
    keras.backend.clear_session()
    return path


@pytest.fixture(scope="session")
def tuned_factory(prefect_harness, tmp_path_factory):
    """Every registered model trained with ``--profile tuned`` (two epochs, small inputs), each
    pretrained backbone loaded from a local weights file or module as ``--weights PATH`` does."""
    from flows.train import train_models

    root = tmp_path_factory.mktemp("tuned")
    for kind, (params, n) in TEST_DATA.items():
        phantoms.write_dataset(kind, root / "data" / kind, n, seed=11, **params)
    weights = {"ct-inception-hub": str(make_tiny_hub_module(root / "tiny-hub-module")),
               "lc25000-inception-mixed7": str(save_random_notop_weights("InceptionV3",
                                                                         root / "inception_v3_notop.weights.h5"))}
    resnet = str(save_random_notop_weights("ResNet50", root / "resnet50_notop.weights.h5"))
    weights.update({name: resnet for name in ("chest-resnet50", "chest-chained")})
    bundles = train_models(models=registry.names(), profile="tuned", source="local", data_dir=str(root / "data"),
                           exports_dir=str(root / "exports"), work_dir=str(root / "work"),
                           epochs=2, batch_size=4, input_shape=small_input_shapes(), weights=weights)
    return {"root": root, "bundles": bundles, "weights": weights}
