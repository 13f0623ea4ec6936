import copy

import pytest
import torch
from torch import nn

import bngraph
from bngraph.errors import UserError
from bngraph.passes.wrap_activation_modules import wrap_activation_modules
from tests import models


def test_untraceable_model_gets_the_module_level_fallback():
    model = models.Untraceable()
    x = torch.randn(4, 6)
    out, report = bngraph.insert(model, [x])
    assert report.facts["tracing"] == "module-level fallback"
    got = {r["node"]: (r["norm"], r["features"]) for r in report.sections["inserted"]}
    assert got == {"act1": ("BatchNorm1d", 8), "act2": ("BatchNorm1d", 8)}
    assert isinstance(out.act1, nn.Sequential) and isinstance(out.act1.bn, nn.BatchNorm1d)
    out.train()(torch.randn(6, 6)).sum().backward()
    again, report2 = bngraph.insert(out, [x])
    assert report2.sections["inserted"] == []  # idempotent here too


def test_fallback_with_preserve_keeps_the_eval_function():
    model = models.Untraceable()
    out, _ = bngraph.insert(model, [torch.randn(4, 6)], preserve=True)
    x = torch.randn(9, 6)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_refuses_an_activation_module_called_twice():
    class Twice(models.Untraceable):
        def forward(self, x):
            y = self.act1(self.fc1(x))
            if y.sum() > 0:
                y = y * 2
            return self.head(self.act1(self.fc2(y)))

    result = wrap_activation_modules(copy.deepcopy(Twice()), [torch.randn(4, 6)])
    reasons = {s.site: s.reason for s in result.skipped}
    assert "called 2 times" in reasons["act1"]
    assert "act1" not in result.changed


def test_without_fallback_the_error_names_the_line():
    with pytest.raises(UserError, match=r"could not trace Untraceable at .*models\.py:\d+"):
        bngraph.insert(models.Untraceable(), [torch.randn(4, 6)], fallback=False)
