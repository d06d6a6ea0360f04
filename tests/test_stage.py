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


def test_a_part_whose_file_is_damaged_is_not_done(tmp_path):
    st = Stage(tmp_path / "s", {"a": 1}).open()
    table = tmp_path / "table.csv"
    table.write_text("x,y\n1,2\n3,4\n5,6\n")
    st.finish("p", {"rows": 3}, files=[table])
    assert st.done("p") and st.info("p") == {"rows": 3} and st.broken() == {}
    table.write_text("x,y\n1,2\n3,4\n")
    assert not st.done("p") and st.parts() == []
    assert st.broken() == {"p": f"{table} has 2 rows, 3 were written"}
    table.write_text("x,y\n1,2\n3,4\n5,7\n")  # same rows, other bytes
    assert "differs from what was written" in st.why_not_done("p")
    table.write_bytes(b"\xff\x00")
    assert "does not parse" in st.why_not_done("p")
    table.unlink()
    assert st.why_not_done("p") == f"{table} is missing"
    assert st.why_not_done("q") == "it did not finish"
