"""The pure parts of OS packages for native builds: soname table, derived tag, Dockerfile."""

from __future__ import annotations

from mlflow_dock.imaging import ospackages


def test_known_sonames_map_to_sorted_unique_debian_packages():
    missing = ["libgomp.so.1", "libgfortran.so.5", "libquadmath.so.0", "libglib-2.0.so.0"]
    assert ospackages.packages_for([*missing, "libgthread-2.0.so.0"]) == (
        "libgfortran5",
        "libglib2.0-0",
        "libgomp1",
        "libquadmath0",
    )
    assert ospackages.packages_for(["libstdc++.so.6"]) == ("libstdc++6",)


def test_an_unknown_soname_or_nothing_missing_gives_no_packages():
    assert ospackages.packages_for(["libgomp.so.1", "libcuda.so.1"]) is None
    assert ospackages.packages_for([]) is None


def test_derived_tag_is_content_addressed():
    tag = ospackages.derived_tag("sha256:" + "a" * 64, ["libgomp1", "libgfortran5"])
    assert tag == ospackages.derived_tag("sha256:" + "a" * 64, ["libgfortran5", "libgomp1"])
    assert tag != ospackages.derived_tag("sha256:" + "b" * 64, ["libgfortran5", "libgomp1"])
    assert tag != ospackages.derived_tag("sha256:" + "a" * 64, ["libgomp1"])
    assert tag.startswith("os-") and len(tag) <= 128


def test_dockerfile_pins_the_base_and_leaves_no_apt_lists_or_caches():
    text = ospackages.render_derived_dockerfile("r.test/base@sha256:" + "a" * 64, ["libgomp1"])
    assert text.startswith("FROM r.test/base@sha256:")
    assert "apt-get install -y --no-install-recommends libgomp1" in text
    assert "/var/lib/apt/lists/*" in text and "/var/cache/apt/*.bin" in text


def test_lacking_names_known_packages_whose_sonames_the_base_does_not_have():
    base = {"libc.so.6", "libstdc++.so.6"}
    assert ospackages.lacking(["libgomp1", "libstdc++6", "build-essential"], base) == ("libgomp1",)
    assert ospackages.lacking(["libgomp1"], base | {"libgomp.so.1"}) == ()
