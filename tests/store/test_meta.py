"""The store's key-value memory: when watching began, runtime images per repository."""

from __future__ import annotations


def test_watch_since_is_set_once(store):
    assert store.watch_since() == store.watch_since()


def test_runtime_images_are_remembered_per_repository(store):
    key = "native/" + "k" * 200  # longer than a meta key: stored under a hash
    assert store.runtime_image(key, "reg/team/a") is None
    store.remember_runtime_image(key, "reg/team/a", "sha256:" + "1" * 64)
    store.remember_runtime_image(key, "reg/team/a", "sha256:" + "2" * 64)  # rebuilt: newest
    assert store.runtime_image(key, "reg/team/a") == "sha256:" + "2" * 64
    assert store.runtime_image(key, "reg/team/b") is None
