"""Budgets are checked before spending and never exceeded; the odometer survives restarts."""

import pytest

from fedcomm.privacy.budget import BudgetExhausted, PrivacyAccount, PrivacyBudget
from fedcomm.privacy.events import gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash

MESSAGE = gaussian_release("message", 4.0, 1.0)  # replace-one, sensitivity 2C
FEEDBACK = gaussian_release("feedback", 6.0, 0.5)
DPSGD = gaussian_release("dpsgd", 1.1, 1.0, relation="add_remove", sample_rate=0.05, count=20)


@pytest.mark.parametrize("accountant", ["rdp", "exact"])
def test_refused_at_the_boundary_never_past_it(accountant):
    budget = PrivacyBudget(5.0, 1e-5, accountant)
    account = PrivacyAccount(budget, unit="history")
    made = 0
    while True:
        before = account.spent().composed
        assert before <= budget.epsilon
        try:
            account.check([MESSAGE], batch=made)
        except BudgetExhausted as exc:
            assert exc.requested > budget.epsilon >= exc.spent == before
            assert exc.remaining == pytest.approx(budget.epsilon - before, abs=1e-6)
            assert exc.difference == pytest.approx(exc.requested - budget.epsilon)
            text = str(exc)
            assert f"{exc.requested:.6f}" in text and f"remaining {exc.remaining:.6f}" in text
            assert "over the budget of 5.000000" in text and "nothing was released" in text
            break
        account.record([MESSAGE], batch=made)
        made += 1
    assert made > 1
    # The refused release would have crossed the budget; everything before it did not.
    assert budget.epsilon_of([MESSAGE] * made) <= budget.epsilon
    assert budget.epsilon_of([MESSAGE] * (made + 1)) > budget.epsilon


def test_episode_unit_composes_within_a_batch_only():
    budget = PrivacyBudget(5.0, 1e-5, "rdp")
    batch = [MESSAGE] * 3 + [FEEDBACK]  # epsilon 4.34: one batch fits, two do not
    account = PrivacyAccount(budget, unit="episode")
    for b in range(20):  # other batches hold other episodes: nothing accumulates
        account.check(batch, batch=b)
        account.record(batch, batch=b)
    assert account.spent().composed == budget.epsilon_of(batch) <= 5.0
    with pytest.raises(BudgetExhausted):
        account.check(batch, batch=3)  # a second use of batch 3's episodes
    history = PrivacyAccount(budget, unit="history")
    history.record(batch, batch=0)
    with pytest.raises(BudgetExhausted):
        history.check(batch, batch=1)  # under "history" every release composes


def test_spent_per_mechanism_and_mixed_relations():
    budget = PrivacyBudget(50.0, 1e-5, "rdp", relation="replace_one")
    account = PrivacyAccount(budget, unit="episode")
    account.record([MESSAGE, MESSAGE, FEEDBACK, DPSGD], batch=0)
    spent = account.spent()
    assert set(spent.per_mechanism) == {"message", "feedback", "dpsgd"}
    # DP-SGD alone is stated under its own relation (add/remove); the composition re-analyses
    # it under replace-one, so it is at least every part.
    assert spent.per_mechanism["dpsgd"] == budget.accountant.epsilon([DPSGD], 1e-5)
    assert spent.composed >= budget.epsilon_of([DPSGD]) > spent.per_mechanism["dpsgd"]
    assert spent.composed >= max(spent.per_mechanism.values())
    assert spent.remaining == pytest.approx(50.0 - spent.composed, abs=1e-6)
    assert spent.remaining <= 50.0 - spent.composed


def test_spend_writes_ahead_and_restart_rebuilds(tmp_path):
    budget = PrivacyBudget(4.0, 1e-5, "rdp")
    path = tmp_path / "a0.jsonl"
    with Ledger(path, "a0", config_hash({})) as ledger:
        account = PrivacyAccount(budget, unit="history", agent="a0")
        made = 0
        with pytest.raises(BudgetExhausted, match="for a0"):
            for r in range(100):
                account.spend(ledger, [MESSAGE], round=r, batch=r)
                made += 1
        assert made >= 2 and len(ledger) == made  # the refused release was not written
        spent = account.spent()
        rebuilt = PrivacyAccount.from_ledger(ledger.entries, budget, "history", "a0")
    assert rebuilt.spent() == spent
    assert spent.composed <= budget.epsilon
    with pytest.raises(ValueError, match="unit"):
        PrivacyAccount.from_ledger(ledger.entries, budget, "episode")


def test_budget_validation():
    with pytest.raises(ValueError, match="positive"):
        PrivacyBudget(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(1.0, 1.0)
    with pytest.raises(ValueError, match="relation"):
        PrivacyBudget(1.0, 1e-5, relation="swap")
    with pytest.raises(ValueError, match="unit"):
        PrivacyAccount(PrivacyBudget(1.0, 1e-5), unit="step")
