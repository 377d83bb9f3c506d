from prefixserve.config import SchedulerConfig
from prefixserve.engine.kv_pages import KVPageManager
from prefixserve.engine.request import Request, RequestStatus, SamplingParams
from prefixserve.engine.scheduler import Scheduler


def make(num_pages=16, max_num_seqs=4, budget=32):
    pages = KVPageManager(num_pages, page_size=4)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), pages), pages


def request(n, rid):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=4))


def complete(step):
    for r, n in zip(step.requests, step.num_new_tokens):
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.token_ids.append(7)  # as if sampled


def test_token_budget_chunks_long_prompts_and_running_go_first():
    sched, _ = make(budget=8)
    long, short = request(20, "long"), request(3, "short")
    sched.add(long)
    sched.add(short)
    step = sched.schedule()
    assert [r.request_id for r in step.requests] == ["long"] and step.num_new_tokens == [8]
    complete(step)
    step = sched.schedule()
    assert [(r.request_id, n) for r, n in zip(step.requests, step.num_new_tokens)] == [("long", 8)]
    complete(step)
    step = sched.schedule()  # the last 4 prompt tokens of long, then short fits in the rest
    assert [(r.request_id, n) for r, n in zip(step.requests, step.num_new_tokens)] == [("long", 4), ("short", 3)]


def test_max_num_seqs_bounds_the_batch():
    sched, _ = make(max_num_seqs=2)
    for i in range(3):
        sched.add(request(2, str(i)))
    step = sched.schedule()
    assert len(step.requests) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_latest_and_requeues_it_first():
    sched, pages = make(num_pages=3)  # 12 token slots
    a, b = request(4, "a"), request(4, "b")
    sched.add(a)
    sched.add(b)
    complete(sched.schedule())  # a: 4 tokens + 1 sampled, b: same; 2 pages used
    step = sched.schedule()  # both need a second page, only one is free
    assert [r.request_id for r in step.requests] == ["a"] and step.preempted == [b]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.page_ids == []
    assert sched.waiting[0] is b and b.token_ids[-1] == 7  # sampled tokens are kept for recompute
    assert pages.num_free_pages == 1


def test_finish_frees_pages():
    sched, pages = make()
    r = request(5, "r")
    sched.add(r)
    sched.schedule()
    sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert pages.num_free_pages == pages.num_pages and not sched.running and r.status.is_finished


def tenant_request(rid, tenant, weight=1.0, n=4):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=64), tenant=tenant,
                   tenant_weight=weight)


def run_backlogged(sched, weights, steps, per_tenant=40):
    """Every tenant keeps `per_tenant` requests queued; returns tokens computed per tenant."""
    served = dict.fromkeys(weights, 0)
    counter = 0
    for tenant, weight in weights.items():
        for _ in range(per_tenant):
            sched.add(tenant_request(f"{tenant}-{counter}", tenant, weight))
            counter += 1
    for _ in range(steps):
        step = sched.schedule()
        complete(step)
        for r, n in zip(step.requests, step.num_new_tokens):
            served[r.tenant] += n
        for r in list(sched.running):  # short requests: finish after 8 output tokens, then refill
            if r.num_output_tokens >= 8:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
                sched.add(tenant_request(f"{r.tenant}-{counter}", r.tenant, r.tenant_weight))
                counter += 1
    return served


def test_backlogged_tenants_share_tokens_by_weight():
    sched, _ = make(num_pages=256, max_num_seqs=8, budget=64)
    served = run_backlogged(sched, {"a": 1.0, "b": 2.0, "c": 1.0}, steps=400)
    total = sum(served.values())
    for tenant, weight in {"a": 0.25, "b": 0.5, "c": 0.25}.items():
        assert abs(served[tenant] / total - weight) < 0.02, served


def test_a_late_tenant_is_not_queued_behind_another_tenants_backlog():
    sched, _ = make(num_pages=256, max_num_seqs=2, budget=64)
    for i in range(10):  # tenant a queues ten requests first; FIFO would run all ten before b0
        sched.add(tenant_request(f"a{i}", "a"))
    sched.add(tenant_request("b0", "b"))
    step = sched.schedule()
    assert [r.request_id for r in step.requests] == ["a0", "b0"]


def test_an_idle_tenant_banks_no_credit():
    sched, _ = make(num_pages=256, max_num_seqs=4, budget=64)
    run_backlogged(sched, {"a": 1.0}, steps=50, per_tenant=4)
    sched.add(tenant_request("late", "b"))
    assert sched.virtual_tokens["b"] == min(v for t, v in sched.virtual_tokens.items() if t != "b")


def test_tenant_counters_are_dropped_when_a_tenant_has_nothing_left():
    sched, _ = make()
    r = tenant_request("x", "t")
    sched.add(r)
    complete(sched.schedule())
    sched.finish(r, RequestStatus.FINISHED_LENGTH)
    assert sched.virtual_tokens == {} and sched._num_unfinished == {}


def _scheduled(step):
    return [(r.request_id, n) for r, n in zip(step.requests, step.num_new_tokens)]


def test_prompt_tokens_are_capped_while_others_decode_and_get_the_whole_budget_when_none_do():
    pages = KVPageManager(64, page_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_tokens_with_decodes=8),
                      pages)
    first = request(20, "first")
    sched.add(first)
    step = sched.schedule()  # nothing decodes: the prompt may take the whole budget
    assert _scheduled(step) == [("first", 20)]
    complete(step)
    long, short = request(30, "long"), request(5, "short")
    sched.add(long)
    sched.add(short)
    step = sched.schedule()  # first decodes: 8 prompt tokens in all, the rest of the budget unused
    assert _scheduled(step) == [("first", 1), ("long", 8)]
    complete(step)
    step = sched.schedule()  # long's next chunk takes the prompt share; short waits for one with room
    assert _scheduled(step) == [("first", 1), ("long", 8)]
    complete(step)
    steps = 0
    while long.num_computed_tokens < len(long.prompt_token_ids):  # never starved: the prompt share each step
        step = sched.schedule()
        assert ("first", 1) in _scheduled(step) and sum(n for _, n in _scheduled(step)) == 1 + 8
        complete(step)
        steps += 1
    assert steps == 2 and _scheduled(step)[1:] == [("long", 6), ("short", 2)]  # 30 = 8 + 8 + 8 + 6


def test_no_prefill_cap_keeps_the_plain_budget():
    pages = KVPageManager(64, page_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                      max_prefill_tokens_with_decodes=None), pages)
    first = request(4, "first")
    sched.add(first)
    complete(sched.schedule())
    sched.add(request(40, "long"))
    assert _scheduled(sched.schedule()) == [("first", 1), ("long", 31)]
