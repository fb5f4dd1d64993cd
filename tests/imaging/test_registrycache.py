"""The registry as the shared layer cache: entries, lookups, publishing, and what is ignored."""

from __future__ import annotations

import json

import pytest

from mlflow_dock.imaging import layers, registrycache
from mlflow_dock.imaging.layercache import CachedLayer
from mlflow_dock.imaging.registrycache import RegistryLayerCache
from mlflow_dock.oci.reference import ImageRef
from support.registry import OciRegistry, sha256

HOST = "registry.example.com"
CACHE = ImageRef(f"{HOST}/team/mlflow-dock-cache")
KEY = "ab" * 32
GZIP = layers.Gzip()
BLOB = b"\x1f\x8b layer bytes"
DIFF_ID = "sha256:" + "d" * 64


def pushed(registry: OciRegistry, repository: str = "team/model-a") -> CachedLayer:
    digest = registry.put_blob(repository, BLOB)
    return CachedLayer(digest, DIFF_ID, len(BLOB), repository)


def uploaded(registry: OciRegistry) -> list[str]:
    """Digests of the blobs whose bytes were sent (monolithic PUTs ending an upload)."""
    return [
        str(e.request.url.params["digest"])
        for e in registry.log
        if e.request.method == "PUT" and e.route.kind == "upload" and e.response.status_code < 300
    ]


def test_a_published_layer_is_found_by_any_worker_and_lives_in_the_cache_repository():
    registry = OciRegistry()
    layer = pushed(registry)
    logs: list[str] = []
    with registry.client() as client:
        RegistryLayerCache(CACHE).publish(
            client, KEY, GZIP, layer, label="numpy==2.0.1", data=BLOB, log=logs.append
        )
    assert not logs
    # Mounted, not uploaded: the registry links the blob it has.
    assert ("team/mlflow-dock-cache", layer.digest) in registry.blobs
    assert uploaded(registry) == [registrycache.EMPTY_DIGEST]  # the artifact's empty config
    document = registry.doc("team/mlflow-dock-cache", f"gzip-{KEY}")
    assert document["artifactType"] == registrycache.ARTIFACT_TYPE
    assert document["layers"][0]["annotations"]["io.mlflow-dock.layer.content"] == "numpy==2.0.1"

    # Another worker (another client, another cache object: nothing shared but the registry).
    with registry.client() as client:
        found = RegistryLayerCache(CACHE).find(client, KEY, GZIP, logs.append)
    assert found == CachedLayer(layer.digest, DIFF_ID, len(BLOB), "team/mlflow-dock-cache")


def test_entries_are_per_codec_and_exactly_ours():
    registry = OciRegistry()
    layer = pushed(registry)
    cache = RegistryLayerCache(CACHE)
    with registry.client() as client:
        cache.publish(client, KEY, GZIP, layer, label="x", data=BLOB, log=print)
        assert cache.find(client, KEY, layers.Zstd(), print) is None
        assert cache.find(client, "cd" * 32, GZIP, print) is None
        # Something else under our tag (an image, an entry naming another key) is a miss.
        other = registrycache.layer_entry("cd" * 32, GZIP, layer, label="x")
        registry.put_manifest(
            "team/mlflow-dock-cache", other.body, other.media_type, tag=f"gzip-{'ef' * 32}"
        )
        assert cache.find(client, "ef" * 32, GZIP, print) is None


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("artifactType"),
        lambda d: d["annotations"].update({registrycache.KEY_ANNOTATION: "cd" * 32}),
        lambda d: d["layers"].append(d["layers"][0]),
        lambda d: d["layers"][0].update(mediaType=layers.OCI_LAYER_ZSTD),
        lambda d: d["layers"][0].update(digest="sha256:short"),
        lambda d: d["layers"][0]["annotations"].pop(registrycache.DIFF_ID_ANNOTATION),
        lambda d: d["layers"][0].update(size=-1),
        lambda d: d["layers"][0].update(size=True),
    ],
)
def test_malformed_entries_are_misses(change):
    layer = CachedLayer("sha256:" + "a" * 64, DIFF_ID, 3, "r")
    document = json.loads(registrycache.layer_entry(KEY, GZIP, layer, label="x").body)
    assert registrycache.read_layer_entry(json.dumps(document).encode(), KEY, GZIP) is not None
    change(document)
    assert registrycache.read_layer_entry(json.dumps(document).encode(), KEY, GZIP) is None
    assert registrycache.read_layer_entry(b"not json", KEY, GZIP) is None


def test_the_same_layer_published_twice_is_the_same_entry():
    layer = CachedLayer("sha256:" + "a" * 64, DIFF_ID, 3, "r")
    one = registrycache.layer_entry(KEY, GZIP, layer, label="x")
    assert one.digest == registrycache.layer_entry(KEY, GZIP, layer, label="x").digest


def test_a_registry_that_does_not_mount_gets_the_blob_uploaded():
    registry = OciRegistry(mount=False)
    layer = pushed(registry)
    with registry.client() as client:
        RegistryLayerCache(CACHE).publish(client, KEY, GZIP, layer, label="x", data=BLOB, log=print)
    assert registry.blobs[("team/mlflow-dock-cache", layer.digest)] == BLOB
    assert registry.resolve("team/mlflow-dock-cache", f"gzip-{KEY}") is not None


def test_a_cache_repository_that_refuses_writes_is_reported_once_then_left_alone():
    registry = OciRegistry()
    layer = pushed(registry)
    registry.faults[("PUT", "manifest")] = 403
    logs: list[str] = []
    cache = RegistryLayerCache(CACHE)
    with registry.client() as client:
        cache.publish(client, KEY, GZIP, layer, label="x", data=BLOB, log=logs.append)
        before = len(registry.log)
        cache.publish(client, "cd" * 32, GZIP, layer, label="y", data=BLOB, log=logs.append)
    assert len(logs) == 1 and "layer cache off" in logs[0]
    assert len(registry.log) == before  # no request at all after the refusal


def test_failed_lookups_are_misses():
    registry = OciRegistry()
    registry.faults[("GET", "manifest")] = 500
    with registry.client() as client:
        assert RegistryLayerCache(CACHE).find(client, KEY, GZIP, print) is None
    registry.faults[("GET", "manifest")] = 403
    with registry.client() as client:
        assert RegistryLayerCache(CACHE).find(client, KEY, GZIP, print) is None


def test_the_cache_repository_is_prepared_once_before_the_first_write():
    registry = OciRegistry()
    layer = pushed(registry)
    prepared: list[ImageRef] = []
    cache = RegistryLayerCache(CACHE, prepare_repository=prepared.append)
    with registry.client() as client:
        assert cache.find(client, KEY, GZIP, print) is None  # lookups prepare nothing
        for key in (KEY, "cd" * 32):
            cache.publish(client, key, GZIP, layer, label="x", data=BLOB, log=print)
    assert prepared == [CACHE]


def test_kept_blobs_are_mounted_by_digest():
    registry = OciRegistry()
    first = registry.put_blob("team/model-a", b"base layer 1")
    second = registry.put_blob("team/model-a", b"base layer 2")
    descriptors = [
        {"mediaType": layers.OCI_LAYER_ZSTD, "digest": first, "size": 12},
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "digest": second,
            "size": 12,
        },
    ]
    name = registrycache.base_name("sha256:" + "9" * 64)
    assert name == "base-" + "9" * 64
    cache = RegistryLayerCache(CACHE)
    with registry.client() as client:
        assert not cache.kept(client, name)
        assert not cache.mount(client, "team/model-b", first)
        cache.keep(client, name, descriptors, repository="team/model-a", log=print)
        assert cache.kept(client, name)
        assert cache.mount(client, "team/model-b", first)
    assert registry.blobs[("team/model-b", first)] == b"base layer 1"
    assert ("team/mlflow-dock-cache", second) in registry.blobs


def test_without_the_registry_cache_nothing_is_asked():
    registry = OciRegistry()
    shared = registrycache.NoSharedLayers()
    with registry.client() as client:
        assert shared.find(client, KEY, GZIP, print) is None
        shared.publish(client, KEY, GZIP, pushed(registry), label="x", data=BLOB, log=print)
        assert not shared.kept(client, "base-x") and not shared.mount(client, "r", sha256(b""))
    assert registry.log == []
