"""rollfast_contrib: optimizers that Optax lacks, each from its paper.

``soap`` (Vyas et al., 2024), ``mars`` (Yuan et al., 2024), ``qhadamw`` (Ma &
Yarats, 2019), ``normuon`` (2025), ``apollo`` (Zhu et al., 2024) and ``adamw8bit``
(Dettmers et al., 2021), registered as rollfast families from the
``precondition`` hook. Each module holds one optimizer: a ``scale_by_*``
direction and the complete optimizer (decoupled weight decay, learning rate);
steps with non-finite gradients are skipped by the core's policy.
"""

from __future__ import annotations

import rollfast
from rollfast.constraints import BETA, LEARNING_RATE, NONNEGATIVE, POSITIVE_INT, Schedule
from rollfast_contrib import adamw8bit, apollo, mars, normuon, qhadamw, soap

# SOAP's options, declared at registration while its module is rewritten elsewhere.
SOAP_CONSTRAINTS = {"learning_rate": LEARNING_RATE, "b1": BETA, "b2": BETA, "eps": NONNEGATIVE,
                    "weight_decay": Schedule(NONNEGATIVE), "precondition_frequency": POSITIVE_INT}


@rollfast.hookimpl
def precondition(register):
    register.family("soap", soap.soap, first_moment=soap.first_moment,
                    references=soap.REFERENCES, constraints=SOAP_CONSTRAINTS)
    register.family("mars", mars.mars, first_moment=mars.first_moment,
                    references=mars.REFERENCES)
    register.family("qhadamw", qhadamw.qhadamw, first_moment=qhadamw.first_moment,
                    references=qhadamw.REFERENCES)
    register.family("normuon", normuon.normuon, first_moment=normuon.first_moment,
                    references=normuon.REFERENCES)
    register.family("apollo", apollo.apollo, references=apollo.REFERENCES)
    register.family("adamw8bit", adamw8bit.adamw8bit, aliases=("adamw_8bit",),
                    first_moment=adamw8bit.first_moment, references=adamw8bit.REFERENCES)
