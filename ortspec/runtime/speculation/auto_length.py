"""Auto γ: each round, the draft length with the best predicted throughput from this machine's calibrated
round costs and each draft position's running chance of acceptance."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ortspec.runtime.speculation.calibration import Calibration, best_count, best_gamma, best_prefix, prefix_speedups
from ortspec.runtime.speculation.proposal import Proposal


class AcceptanceEstimate:
    """Running estimates of each draft position's chance of acceptance, given that the drafts before it
    were accepted; kept across generations.

    A draft model's later guesses build on its own earlier ones, so they are accepted less often (a
    feature head's second guess far less than its first): one rate for all would make γ = 2 look as
    good as γ = 1 and the first draft as bad as the average. Position d is judged in every round that
    drafted it after d - 1 accepted drafts; drafts after a round's first rejection are never judged.
    Every position forgets slowly (`decay` per drafted round) so that it follows the text being
    generated, judged in that round or not: a position γ stopped reaching after a few unlucky verdicts
    drifts back to leaning on the one before it and is tried again, rather than staying condemned by
    verdicts that are never revisited (which kept γ at 1 for good on a drafter right 3 times in 4).
    The first position starts from `prior` (pseudo-counts of weight `strength`, forgotten like
    judgements); a later one leans on the position before it until it has been judged a few times.
    """

    LEAN = 2.0  # weight of the previous position's chance in a later position's estimate

    def __init__(self, prior: float = 0.6, strength: float = 4.0, decay: float = 0.97) -> None:
        self.accepted = [prior * strength]  # per position: decayed count of acceptances
        self.judged = [strength]  # per position: decayed count of judgements
        self.decay = decay

    @property
    def alpha(self) -> float:
        """The first draft's chance of acceptance."""
        return self.chances(1)[0]

    def chances(self, count: int) -> list[float]:
        """Each of the first `count` positions' chance of acceptance, given the ones before were accepted."""
        chances = [self.accepted[0] / self.judged[0]]
        for position in range(1, count):
            seen = position < len(self.judged)
            accepted, judged = (self.accepted[position], self.judged[position]) if seen else (0.0, 0.0)
            chances.append((accepted + self.LEAN * chances[-1]) / (judged + self.LEAN))
        return chances[:count]

    def update(self, drafted: int, accepted: int) -> None:
        judged = min(accepted + 1, drafted)
        for position in range(max(judged, len(self.judged))):
            if position == len(self.judged):
                self.accepted.append(0.0)
                self.judged.append(0.0)
            self.accepted[position] *= self.decay
            self.judged[position] *= self.decay
            if position < judged:
                self.accepted[position] += position < accepted
                self.judged[position] += 1


class RoundCosts:
    """How much slower drafted rounds run in this loop than calibrated, relative to plain rounds.

    Calibration times the model calls in steady state; the live loop adds Python work, the draft's
    weights falling out of the CPU caches between calls, and load, none of which hit plain and drafted
    rounds alike. Each round's whole cycle (start to start of the next) over its calibrated time is
    one observation (clipped: a preempted round must not swing the choice). Plain rounds feed a
    running mean of their ratio, `plain` (how fast the machine runs now against its calibration);
    each drafted round's ratio over `plain` at that moment feeds `slowdown`, which scales the
    predicted cost of drafted rounds. So a stretch of plain rounds on a machine that got quieter (or
    busier) since calibration does not pass for drafting having become dearer (or cheaper).

    While the loop drafts, `plain` goes unmeasured, so a burst of load on a shared machine passes for
    dear drafting; and while it decodes plainly, `slowdown` goes unmeasured, so such a reading would
    keep it from drafting for good. So each plain round relaxes `slowdown` towards 1 (the calibration)
    by `RELAX`: drafting that really is slow is seen again within a few rounds, a stale reading fades.
    """

    WEIGHT = 0.1  # of each new observation in the running means
    RELAX = 0.05  # share of its distance to 1 that `slowdown` loses each plain round
    CLIP = (0.5, 3.0)  # bounds of one observation's ratio

    def __init__(self) -> None:
        self.plain = 1.0
        self.slowdown = 1.0

    @property
    def coarse_slowdown(self) -> float:
        """`slowdown` in steps of 0.05: choices do not flicker on noise, and it can key a memo."""
        return round(self.slowdown * 20) / 20

    def _clip(self, ratio: float) -> float:
        return min(max(ratio, self.CLIP[0]), self.CLIP[1])

    def observe(self, drafted: bool, measured_ms: float, calibrated_ms: float) -> None:
        ratio = self._clip(measured_ms / calibrated_ms)
        if drafted:
            self.slowdown += self.WEIGHT * (self._clip(ratio / self.plain) - self.slowdown)
        else:
            self.plain += self.WEIGHT * (ratio - self.plain)
            self.slowdown += self.RELAX * (1.0 - self.slowdown)


@dataclass
class AutoState:
    """What auto γ learns about one pipeline and drafter, kept across its generations (concurrent ones
    too: they update it under `lock`)."""

    estimate: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    costs: RoundCosts = field(default_factory=RoundCosts)
    plain_ms_since_probe: float = 0.0  # calibrated time of the plain rounds since the last drafted one
    probe_ratio: float | None = None  # what probes were seen to cost beyond a plain round over the calibrated cost
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass
class AutoMemo:
    """Auto γ's per-context costs, pure functions of one calibration: shared by the generations that
    use it (a race only computes an entry twice, to the same value)."""

    rounds: dict[int, list[float]] = field(default_factory=dict)  # bucket -> ms of a round with γ = 0..max drafts
    catch_up: dict[int, float] = field(default_factory=dict)  # bucket -> ms per token the draft catches up on
    draft: dict[int, float] = field(default_factory=dict)  # bucket -> ms of one draft step
    can_pay: dict[tuple[int, float, int], bool] = field(default_factory=dict)
    plain: dict[tuple[int, int], float] = field(default_factory=dict)  # (bucket, rows) -> ms a plain round adds


class AutoDraftLength:
    """γ each round maximising the predicted throughput E(γ) / r(γ) from this machine's round costs,
    E(γ) the expected tokens per round from each draft position's running acceptance estimate.

    γ = 0 (plain decoding) unless some γ is predicted to beat it by 5%, the calibrated costs
    corrected by what the running loop observes (`RoundCosts`). Drafting after a stretch without
    drafts first costs the draft's catch-up: it starts only if the time it is predicted to save over
    the remaining tokens pays for that. While decoding plainly it probes now and then so that a
    better draft than estimated gets noticed: the draft guesses one token, which is held back (the
    round stays plain, no verify position is spent on it) and judged against the target's own token.
    Probes take at most `PROBE_SHARE` of the plain time: a probe costs a draft step plus the catch-up
    on what was decoded since the last one (calibrated, corrected by what probes were seen to cost), so
    cheap drafts probe often (a few tokens apart) and dear ones rarely; never where drafting could not
    pay even at α = 0.99. With `learn_timings` off, the choices depend on the calibration and the
    acceptance seen alone, not on wall time.

    With `scored`, the proposer is free and gives each token its own chance of acceptance
    (`Proposal.confidence`): it is asked for up to `max_gamma` tokens every round, and `choose` sends
    the prefix with the best predicted throughput on the same round costs (none unless it gains 5%).

    With `load` (continuous batching: how many sequences decode in the batch now, this one included),
    a plain round costs what this sequence adds to the batched step of that many rows
    (`Calibration.batched_step`), not a whole step, while a drafted round's verify call still runs
    alone (GroupQueryAttention on the CPU takes several new tokens on a past for one row only) and
    holds up every other row: so speculation fades as the batch fills and returns as it empties,
    chosen afresh each round. Drafting is judged by the throughput of the whole batch, not this
    sequence's speed.

    One instance serves one generation; `state` (what is learned) and `memo` (cached costs) may be
    shared across generations.
    """

    PROBE_SHARE = 0.02
    BUCKET = 32  # contexts are looked at in steps of this many positions: the choice is per round, keep it cheap

    def __init__(
        self,
        calibration: Calibration,
        state: AutoState,
        draft_cost: bool = True,
        max_gamma: int | None = None,
        learn_timings: bool = True,
        scored: bool = False,
        memo: AutoMemo | None = None,
        load: Callable[[], int] | None = None,
    ) -> None:
        self.calibration = calibration
        self.load = load
        self.state = state
        self.draft_cost = draft_cost
        self.scored = scored  # the proposer scores each token: ask for the most, send the best prefix
        self.learn_timings = learn_timings  # False: choices follow the calibration alone (reproducible)
        self.max_gamma = min(max_gamma or calibration.max_gamma, calibration.max_gamma)
        self.memo = memo if memo is not None else AutoMemo()
        self._probing = False
        self._caught_up = False  # this round's draft reads more than the steady loop's one or two tokens
        self._probe_ms = 0.0  # calibrated cost of this round's probe beyond a plain round

    def _center(self, bucket: int) -> int:
        return bucket * self.BUCKET + self.BUCKET // 2

    def _costs(self, bucket: int) -> list[float]:
        memo = self.memo
        if bucket not in memo.rounds:
            context = self._center(bucket)
            memo.catch_up[bucket] = self.calibration.catch_up(1, context) if self.draft_cost else 0.0
            memo.draft[bucket] = self.calibration.draft(context) if self.draft_cost else 0.0
            memo.rounds[bucket] = self.calibration.rounds(context, self.draft_cost)[: self.max_gamma + 1]
        return memo.rounds[bucket]

    def _loaded(self, bucket: int) -> tuple[list[float], int]:
        """(round costs at `bucket` under the batch's present load, the rows decoding in it): a plain
        round costs what one row adds to the batched step, a drafted one all it costs alone."""
        rounds = self._costs(bucket)
        rows = max(self.load(), 1) if self.load is not None else 1
        if rows == 1:
            return rounds, rows
        plain = self.memo.plain.get((bucket, rows))
        if plain is None:
            plain = self.memo.plain[bucket, rows] = self.calibration.batched_step(rows, self._center(bucket))
        return [plain, *rounds[1:]], rows

    def costs(self, context: int) -> list[float]:
        """ms of a round with γ = 0..max_gamma drafts around `context` (cached per bucket of contexts),
        a plain one's as the batch's present load makes it (see `load`)."""
        return self._loaded(context // self.BUCKET)[0]

    @property
    def cap(self) -> int:
        return self.max_gamma

    def next(self, context: int, remaining: int = 1 << 30, pending: int = 0) -> int:
        """γ for the coming round, `context` positions into the sequence, `remaining` new tokens at
        most still to come, `pending` committed tokens the draft must read before drafting."""
        self._probing = False  # a probe is timed before the next choice, or (last of a generation) never
        self._caught_up = False
        if self.scored:
            return self.max_gamma
        bucket = context // self.BUCKET
        rounds, rows = self._loaded(bucket)
        state = self.state
        with state.lock:
            chances, slowdown = state.estimate.chances(self.max_gamma), state.costs.coarse_slowdown
            speedups = prefix_speedups(chances, rounds, slowdown)
            gamma = best_count(speedups)
            catch_up_ms = pending * self.memo.catch_up[bucket]
            if gamma and (pending <= 2 or self._saving_ms(speedups[gamma - 1], rounds, remaining) >= catch_up_ms):
                state.plain_ms_since_probe = 0.0
                self._caught_up = pending > 2
                return gamma
            state.plain_ms_since_probe += rounds[0]
            self._probe_ms = self.memo.draft[bucket] + max(0, pending - 1) * self.memo.catch_up[bucket]
            probe_ms = self._probe_ms * (state.probe_ratio or 1.0)
            can_pay = self._can_pay_at(bucket, slowdown, rounds, rows)
            if state.plain_ms_since_probe * self.PROBE_SHARE < probe_ms or not can_pay:
                return 0
            state.plain_ms_since_probe = 0.0
        self._probing = True
        self._caught_up = pending > 2
        return 1

    def choose(self, proposal: Proposal, context: int) -> int:
        """How many of the proposed tokens to send: all, unless the proposer scored them; then the
        prefix whose expected tokens per round over its calibrated cost is best."""
        if self._probing:
            return 0  # a probe's guess is held back and judged against the target's own token
        if proposal.confidence is None:
            return len(proposal.tokens)
        slowdown = self.state.costs.coarse_slowdown
        return best_prefix(proposal.confidence, self.costs(context), slowdown)

    @staticmethod
    def _saving_ms(speedup: float, rounds: list[float], remaining: int) -> float:
        """Predicted ms saved over `remaining` tokens by drafting at `speedup` instead of decoding plainly."""
        return remaining * rounds[0] * (1 - 1 / speedup)

    def _can_pay_at(self, bucket: int, slowdown: float, rounds: list[float], rows: int) -> bool:
        """Whether drafting could pay here at all (at α = 0.99) with `rounds` (those of `rows` in the batch):
        if not, probing is pointless."""
        key = (bucket, slowdown, rows)
        can_pay = self.memo.can_pay
        if key not in can_pay:
            can_pay[key] = best_gamma(0.99, rounds, slowdown) > 0
        return can_pay[key]

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            with self.state.lock:
                self.state.estimate.update(drafted, accepted)

    def judge_held_back(self, right: bool) -> None:
        """Whether the first draft of a round that sent none was the target's own token."""
        if self._probing:
            self.update(1, int(right))

    def observe(self, drafted: int, measured_ms: float, context: int) -> None:
        """Wall time of a whole round with `drafted` drafts, start to start of the next. A round whose draft
        first caught up on a stretch decoded plainly teaches what probing costs, not how fast drafted
        rounds run: its catch-up (new shapes, cold caches) would pass for slow drafting and keep the loop
        from drafting at all. A round beside other rows of a batch is not timed: its wall time holds theirs
        (a batched step, their lone verify calls), not how fast this machine runs its own calls."""
        if not self.learn_timings or (self.load is not None and self.load() > 1):
            return
        rounds = self._costs(context // self.BUCKET)
        state = self.state
        with state.lock:
            if self._probing:  # a plain round plus the draft's guess, catch-up included: what probing costs
                self._probing = False
                if self._probe_ms > 0:  # (a free drafter's probe costs nothing: its round is a plain one)
                    ratio = min(max(max(measured_ms - rounds[0], 0.0) / self._probe_ms, 0.25), 4.0)
                    previous = state.probe_ratio
                    state.probe_ratio = ratio if previous is None else previous + 0.25 * (ratio - previous)
                    return
            if not (drafted and self._caught_up):
                state.costs.observe(drafted > 0, measured_ms, rounds[drafted])
