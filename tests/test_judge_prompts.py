"""The judges' prompts files (sfgrpo.evaluation.judge_prompts): a wrong one is named, file and template."""

import json

import pytest

from sfgrpo.evaluation.judge_prompts import load_prompts


@pytest.mark.parametrize(
    "content, match",
    [
        (
            {"viescore": {"semantics": "Judge the edit."}},
            r"viescore\.semantics: the template has no \{instruction\}",
        ),
        ({"imgedit": {"edit": "{instruction} only"}}, r"imgedit\.edit: the template has no \{rubric\}"),
        (
            {"regions": {"semantics": "{instruction} {regions} {template}"}},
            r"regions\.semantics: the template has no \{scale\}",
        ),
        (
            {"viescore": {"semantics": "{instruction} {instrution}"}},
            r"unknown placeholder\(s\) \{instrution\}",
        ),
        ({"gedit": {"semantics": "{instruction}"}}, "unknown protocol 'gedit'"),
        ({"viescore": {"semantic": "{instruction}"}}, "unknown template 'semantic'"),
        ({"viescore": {"quality": ""}}, r"viescore\.quality: expected a non-empty template"),
        ({"imgedit": {"rubrics": {"add": "{rubric}"}}}, r"imgedit\.rubrics\.add: unknown placeholder"),
        (["not", "an", "object"], "expected a JSON object by protocol"),
    ],
)
def test_a_prompts_file_is_checked(tmp_path, content, match):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_a_prompts_file_that_is_not_json_or_missing_is_named(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text("{viescore: ")
    with pytest.raises(ValueError, match=f"{path}: not JSON"):
        load_prompts(path)
    with pytest.raises(ValueError, match="cannot read it"):
        load_prompts(tmp_path / "absent.json")
