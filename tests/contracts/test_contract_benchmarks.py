"""Every benchmark (built-in or plugin): what it does with no rows, with rows of another
schema, and where its default source lives."""

from __future__ import annotations

import pytest

from fedsec.errors import ConfigError
from fedsec.registry import registry

BENCHMARKS = registry("benchmark")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_no_rows_give_no_items(name):
    assert list(BENCHMARKS[name]([], {})) == []


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_rows_of_another_schema_are_a_one_line_error_naming_the_benchmark(name):
    with pytest.raises(ConfigError) as err:
        BENCHMARKS[name]([{"unrelated": 1}], {})
    assert err.value.field == f"eval.benchmarks[{name}]" and "\n" not in str(err.value)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_the_default_source_is_none_or_a_dataset_and_split(name):
    hub = BENCHMARKS.entry(name).options["hub"]
    assert hub is None or (len(hub) == 2 and all(isinstance(x, str) and x for x in hub))
