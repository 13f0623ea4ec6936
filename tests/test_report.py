"""The report's two renderings say the same thing, whatever characters the user's model brings."""

import io
import json

from bngraph.report import Report


def test_table_prints_square_brackets_from_the_model_literally():
    # A reason quoting user code (`_BACKENDS[type(x)]`) once lost its brackets to rich's markup.
    reason = "raised at net.py:12 (_BACKENDS[type(x)](x)): KeyError: [bold]"
    sections = {"skipped": [{"node": "relu", "reason": reason}]}
    report = Report("t", sections=sections, facts={"why": "[red]x"}, notes=["see [this]"])
    out = io.StringIO()
    report.print_table(out)
    text = out.getvalue()
    assert "_BACKENDS[type(x)](x)" in text and "KeyError: [bold]" in text
    assert "why: [red]x" in text and "note: see [this]" in text


def test_json_keeps_shapes_as_numbers_and_the_table_as_the_cli_writes_them():
    report = Report("t", sections={"models": [{"input_shape": [2, 3, 32, 32]}]})
    out = io.StringIO()
    report.print_table(out)
    assert "2,3,32,32" in out.getvalue()
    assert json.loads(json.dumps(report.to_json()))["models"][0]["input_shape"] == [2, 3, 32, 32]


def test_a_narrow_terminal_wraps_a_number_and_never_cuts_it(monkeypatch):
    # COLUMNS=30: `bngraph zoo` showed "1126…" for 11268536, and verify's rows were all "…".
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "30")
    out = Terminal()
    Report("t", sections={"models": [{"name": "inception-small", "parameters": 11268536, "input": "2,3,224,224"}]}
           ).print_table(out)
    text = out.getvalue()
    assert "…" not in text and "11268536" in text
