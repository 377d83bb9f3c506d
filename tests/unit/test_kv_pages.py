import pytest

from prefixserve.engine.kv_pages import KVPageManager, OutOfPagesError


def test_allocate_free_and_reuse():
    pages = KVPageManager(num_pages=4, page_size=16)
    a = pages.allocate(3)
    assert len(set(a)) == 3 and pages.num_free_pages == 1
    with pytest.raises(OutOfPagesError, match="asked for 2 pages, 1 free"):
        pages.allocate(2)
    pages.free(a)
    assert pages.num_free_pages == 4


def test_shared_pages_return_only_when_the_last_holder_frees():
    pages = KVPageManager(num_pages=4, page_size=16)
    prefix = pages.allocate(2)
    pages.share(prefix)
    pages.share(prefix)
    assert [pages.ref_count(p) for p in prefix] == [3, 3]
    pages.free(prefix)
    pages.free(prefix)
    assert pages.num_free_pages == 2
    pages.free(prefix)
    assert pages.num_free_pages == 4


def test_double_free_and_sharing_a_free_page_are_errors():
    pages = KVPageManager(num_pages=2, page_size=16)
    p = pages.allocate(1)
    pages.free(p)
    with pytest.raises(ValueError, match="double free"):
        pages.free(p)
    with pytest.raises(ValueError, match="only allocated pages can be shared"):
        pages.share(p)


def test_pages_for_rounds_up():
    pages = KVPageManager(num_pages=2, page_size=16)
    assert [pages.pages_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
