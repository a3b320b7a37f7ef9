"""Stream views in the fleet start where a standalone server's start: the
same log, read once through the output index (taskman.output) and once as
the chunks the fleet stores (taskman.fleet.views)."""

import datetime
import random
import uuid

import pytest

from taskman.fleet import views
from taskman.output import create_log
from taskman.output_index import Selector, Stream


@pytest.fixture
def log(tmp_path):
    log = create_log(str(tmp_path), str(uuid.uuid4()))
    generator = random.Random(7)
    for number in range(300):
        stream = generator.choice((Stream.STDOUT, Stream.STDERR))
        line = f"{number} {'x' * generator.randrange(0, 300)}"
        ending = "\n" if generator.random() < 0.8 else ""
        log.append((line + ending).encode(), stream)
    log.append(b"last line without a newline", Stream.STDOUT)
    log.finish()
    return log


def local_start(log, selector, **view):
    first = next(iter(log.chunks(0, selector, follow=False, **view)), None)
    return first.offset if first is not None else log.size


@pytest.mark.parametrize("selector", list(Selector))
@pytest.mark.parametrize("view", [dict(tail_lines=1), dict(tail_lines=10), dict(tail_lines=10000),
                                  dict(tail_bytes=1), dict(tail_bytes=5000),
                                  dict(tail_bytes=10, tail_lines=50)])
def test_tails_start_where_the_local_index_says(log, selector, view):
    stored = list(log.chunks(0, Selector.ALL, follow=False, chunk_size=4096))
    start = views.view_start(stored, selector, **view)
    selected = [chunk for chunk in log.chunks(start, selector, follow=False)]
    expected = local_start(log, selector, **view)
    assert (selected[0].offset if selected else log.size) == expected


def test_since_and_selection(log):
    stored = list(log.chunks(0, Selector.ALL, follow=False))
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    assert views.view_start(stored, Selector.ALL, since_ns=int(future.timestamp() * 1e9)) \
        == log.size
    assert views.view_start(stored, Selector.ALL, since_ns=0) == 0
    only_errors = b"".join(chunk.data for chunk in views.selected(stored, Selector.STDERR))
    assert only_errors == b"".join(chunk.data for chunk in
                                   log.chunks(0, Selector.STDERR, follow=False))
