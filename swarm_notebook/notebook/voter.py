"""A vote policy that asks the person at the notebook.

Proposals from peers appear in a panel with the proposer, risk, rationale and the code
itself, and Approve / Reject buttons. Without an answer in ``timeout_s`` the fallback policy
decides, and the ballot's reason says so. Everything a peer wrote is shown as plain text
(widget values, never HTML).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from swarm_notebook.errors import short_id
from swarm_notebook.governance.consensus import Proposal
from swarm_notebook.governance.risk import Modification
from swarm_notebook.governance.votes import DefaultVotePolicy, VotePolicy

MAX_SHOWN_CODE = 20_000
FALLBACK_MARGIN_S = 1.0


class NotebookVoter:
    """Ask the notebook's user to vote on every proposal this peer receives.

    >>> voter = NotebookVoter(timeout_s=120)      # doctest: +SKIP
    >>> coordinator.set_vote_policy(voter)        # doctest: +SKIP
    >>> voter                                     # doctest: +SKIP  (shows the panel)
    """

    def __init__(
        self,
        *,
        timeout_s: float = 60.0,
        fallback: VotePolicy | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # Votes are asked for on the network thread; widgets belong to the kernel's loop.
        self._kernel_loop = loop or asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.fallback: VotePolicy = fallback or DefaultVotePolicy()
        self.title = widgets.Label(value="Swarm proposals: none yet")
        self.panel = widgets.VBox([self.title])
        self.cards: dict[str, widgets.VBox] = {}
        self.asked = 0
        # Set by ``Coordinator.set_vote_policy``: proposers shown by their card's name.
        self.name_of: Callable[[str], str | None] | None = None

    def bind_names(self, name_of: Callable[[str], str | None]) -> None:
        """Show proposers by the name on their agent card (``set_vote_policy`` calls it)."""
        self.name_of = name_of

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.panel)

    async def decide(self, proposal: Proposal, modification: Modification) -> tuple[bool, str]:
        network_loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[bool, str]] = network_loop.create_future()

        def answered(approve: bool, reason: str) -> None:
            # Button callbacks run on the kernel's thread; the vote waits on the network loop.
            network_loop.call_soon_threadsafe(_settle, answer, (approve, reason))

        proposer = short_id(proposal.proposer)
        name = self.name_of(proposal.proposer) if self.name_of is not None else None
        if name:
            proposer = f"{name} ({proposer})"
        self._kernel_loop.call_soon_threadsafe(
            self._show, proposal, modification, answered, proposer
        )
        # Leave the fallback time to answer before the proposal itself expires.
        wait = max(0.0, min(self.timeout_s, proposal.deadline - time.time() - FALLBACK_MARGIN_S))
        try:
            return await asyncio.wait_for(asyncio.shield(answer), wait)
        except TimeoutError:
            verdict = self.fallback.decide(proposal, modification)
            approve, reason = await verdict if inspect.isawaitable(verdict) else verdict
            reason = f"no answer from the notebook in {wait:g} s; {reason}"
            self._kernel_loop.call_soon_threadsafe(self._close_card, proposal.id, approve, reason)
            return approve, reason

    def _show(
        self, proposal: Proposal, modification: Modification, answered: Any, proposer: str
    ) -> None:
        self.asked += 1
        self.title.value = f"Swarm proposals: {self.asked} asked"
        header = widgets.Label(
            value=f"{proposal.risk} risk · {modification.operation} {modification.file_path} "
            f"· from {proposer}"
        )
        rationale = widgets.Label(value=f"Why: {proposal.rationale or '(no rationale given)'}")
        code = widgets.Textarea(
            value=modification.code[:MAX_SHOWN_CODE],
            disabled=True,
            layout=widgets.Layout(width="100%", height="8em"),
        )
        reason = widgets.Text(placeholder="reason (optional)")
        approve = widgets.Button(description="Approve", button_style="success", icon="check")
        reject = widgets.Button(description="Reject", button_style="danger", icon="times")
        status = widgets.Label(value=f"waiting for your vote ({self.timeout_s:g} s)")

        def vote(yes: bool) -> None:
            text = reason.value.strip() or (
                "approved in the notebook" if yes else "rejected in the notebook"
            )
            answered(yes, text)
            self._close_card(proposal.id, yes, text)

        approve.on_click(lambda _b: vote(True))
        reject.on_click(lambda _b: vote(False))
        card = widgets.VBox(
            [header, rationale, code, widgets.HBox([approve, reject, reason]), status]
        )
        self.cards[proposal.id] = card
        self.panel.children = (*self.panel.children, card)

    def _close_card(self, proposal_id: str, approve: bool, reason: str) -> None:
        card = self.cards.get(proposal_id)
        if card is None:
            return
        buttons = card.children[3]
        for child in buttons.children:
            child.disabled = True
        card.children[4].value = f"{'approved' if approve else 'rejected'}: {reason}"


def _settle(future: asyncio.Future[tuple[bool, str]], value: tuple[bool, str]) -> None:
    if not future.done():
        future.set_result(value)
