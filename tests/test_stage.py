import json

import pytest

from treeopt.core.errors import TreeoptError
from treeopt.core.stage import Stage, differences


def test_parts_resume_and_settings_are_guarded(tmp_path):
    st = Stage(tmp_path / "s", {"nodes": 16, "seed": 0}, what="bench").open()
    assert st.parts() == [] and not st.done("a")
    st.finish("a", {"tokens": 3})
    st.finish("b")
    again = Stage(tmp_path / "s", {"seed": 0, "nodes": 16}).open()  # key order does not matter
    assert again.parts() == ["a", "b"] and again.info("a") == {"tokens": 3}
    with pytest.raises(TreeoptError, match=r"bench made with other settings \(nodes 16 -> 8\)"):
        Stage(tmp_path / "s", {"nodes": 8, "seed": 0}, what="bench").open()
    fresh = Stage(tmp_path / "s", {"nodes": 8, "seed": 0}).open(restart=True)
    assert fresh.parts() == [] and json.loads(fresh.manifest.read_text()) == {"nodes": 8, "seed": 0}


def test_damaged_marker_is_not_done_and_damaged_manifest_is_one_line(tmp_path):
    st = Stage(tmp_path, {"a": 1}).open()
    (tmp_path / "x.done.json").write_text("{trunc")
    assert not st.done("x") and st.parts() == []
    st.manifest.write_bytes(b"\xff\xfe")
    with pytest.raises(TreeoptError, match="is damaged: delete it"):
        Stage(tmp_path, {"a": 1}).open()


def test_differences_lists_changed_keys():
    assert differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == "b 2 -> 3, c None -> 4"
    assert differences({}, {}) == ""
