"""The MLflow model registry: versions of the captioner, and the aliases that say which one serves.

`candidate` is the newest registered version, `champion` the one that serves, `previous` the champion
before it. Every decision reads the aliases from the registry itself, so a change made by hand in the
MLflow UI is honoured the same way as one made here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .config import BASE_TEST
from .gates import DEFAULT_GATES, Gate, Scorecard, Verdict, check
from .runtime import FashioncapError

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
CIDER_TAG, DIGEST_TAG, RUN_TAG, COMMIT_TAG = "test_cider_d", "data_digest", "run_id", "git_commit"
PROFILE_TAG = "profile"
CIDER_BEFORE_TAG, INIT_VERSION_TAG = "test_cider_d_before", "init_version"  # the init's score on the same test set
# register's digest of what a version serves and was evaluated with (served config, test table): the same
# run registered again with a different one is a new version
REGISTRATION_TAG = "registration_digest"
GATES_TAG = "promotion_gates"  # the gates (registry.gates, JSON) its promotion is held to
PROMOTION_TAG = "promotion"  # the last promotion decision: accepted, refused or forced, against which champion
CARD_GATES = "\n\nPromotion gates against"  # where the model card's gate results begin
# Profiles whose models are demonstrations (a small model on a synthetic catalogue, the test suite's tiny
# params): never a shop's champion by accident, whatever they score on their own test set.
DEMO_PROFILES = ("offline", "offline-adapt")
# score tags: <test split>_<metric>[_before], attributes as <split>_attr_<type>_f1 ("none": the split states none)
SCORE_TAG = re.compile(r"^(?P<split>test|base_test)_(?:attr_)?(?P<metric>[a-z0-9_]+?)(?P<before>_before)?$")


class RegistryError(FashioncapError):
    """A registry operation that cannot or must not happen; the message says why."""


def score_tags(table: dict) -> dict[str, str]:
    """A version's scores as tags, by test split (its own, `test`, and the adapted-from catalogue's, BASE_TEST),
    after fine-tuning and before it (`_before`: the init's): what promotion gates compare."""
    tags = {}
    splits = [("test", table)] + ([(BASE_TEST, table[BASE_TEST])] if BASE_TEST in table else [])
    for split, block in splits:
        for when, suffix in (("after", ""), ("before", "_before")):
            tags.update({f"{split}_{m}{suffix}": str(v) for m, v in block[when].items()})
            for kind, s in block.get("attributes", {}).get(when, {}).items():
                tags[f"{split}_attr_{kind}_f1{suffix}"] = "none" if s["f1"] is None else str(s["f1"])
    if BASE_TEST in table:
        tags[f"{BASE_TEST}_digest"] = table[BASE_TEST]["test_digest"]
    return tags


def scorecard(number: str, tags: dict[str, str], init_version: str | None) -> Scorecard:
    """The version's scores by test-set digest, read back from its score tags."""
    digests = {"test": tags[DIGEST_TAG], BASE_TEST: tags.get(f"{BASE_TEST}_digest")}
    scores, init_scores = {}, {}
    for tag, value in tags.items():
        match = SCORE_TAG.match(tag)
        if match is None or match["metric"] == "digest" or digests[match["split"]] is None:
            continue
        into = init_scores if match["before"] else scores
        into.setdefault(digests[match["split"]], {})[match["metric"]] = None if value == "none" else float(value)
    return Scorecard(number, tags[DIGEST_TAG], scores, init_scores, init_version)


@dataclass(frozen=True)
class Version:
    """What promotion needs to know about a model version."""

    number: str
    profile: str
    scores: Scorecard  # its scores by test split, and its init's (init_version: a version of this model)
    gates: tuple[Gate, ...] = field(default=DEFAULT_GATES)

    @classmethod
    def of(cls, mv, client=None) -> "Version":
        """The version's tags; a version registered before the profile tag takes its run's `profile` tag, one
        registered before its gates were recorded the project's DEFAULT_GATES."""
        tags = mv.tags or {}
        if CIDER_TAG not in tags or DIGEST_TAG not in tags:
            raise RegistryError(f"version {mv.version} has no '{CIDER_TAG}'/'{DIGEST_TAG}' tags to compare by")
        init = tags.get(INIT_VERSION_TAG)
        if tags.get("init_uri") != f"models:/{mv.name}/{init}":
            init = None  # not a version of this registered model
        gates = tuple(Gate.of(g) for g in json.loads(tags[GATES_TAG])) if GATES_TAG in tags else DEFAULT_GATES
        return cls(str(mv.version), tags.get(PROFILE_TAG) or _run_profile(client, mv) or "unknown",
                   scorecard(str(mv.version), tags, init), gates)


def _run_profile(client, mv) -> str | None:
    from mlflow.exceptions import MlflowException

    if client is None or not mv.run_id:
        return None
    try:
        return client.get_run(mv.run_id).data.tags.get(PROFILE_TAG)
    except MlflowException:  # the run was deleted
        return None


def alias_version(client, name: str, alias: str):
    """The model version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def get_version(client, name: str, version: str | None):
    """A version by number, or the candidate when None; a clear error when it does not exist."""
    from mlflow.exceptions import MlflowException

    if version is None:
        found = alias_version(client, name, CANDIDATE)
        if found is None:
            raise RegistryError(f"model '{name}' has no '{CANDIDATE}' version: run the pipeline (dvc repro) first")
        return found
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model '{name}' has no version {version}") from None


def demo_refusal(candidate: Version, champion: Version) -> str | None:
    """A demonstration never replaces a champion of a real profile, whatever it scores."""
    if candidate.profile in DEMO_PROFILES and champion.profile not in DEMO_PROFILES:
        return (f"version {candidate.number} was trained by the '{candidate.profile}' profile, a demonstration, and "
                f"{CHAMPION} version {champion.number} by the '{champion.profile}' profile: a demonstration model "
                f"does not replace it. Use --force to promote anyway")
    return None


def refusal(candidate: Version, champion: Version | None, force: bool) -> str | None:
    """Why the candidate must not replace the champion, or None when it may."""
    if champion is None or force:
        return None
    if candidate.number == champion.number:
        return f"version {candidate.number} is already the {CHAMPION}"
    if reason := demo_refusal(candidate, champion):
        return reason
    found = verdicts(candidate, champion)
    if not all(v.passed for v in found):
        return gate_refusal(candidate, champion, found)
    return None


def verdicts(candidate: Version, champion: Version) -> list[Verdict]:
    """The candidate's gates (those it was registered with) against the champion."""
    return check(candidate.gates, candidate.scores, champion.scores)


def gate_refusal(candidate: Version, champion: Version, found: list[Verdict]) -> str:
    """Every gate with both numbers and its verdict, headed by how many failed."""
    failed = sum(not v.passed for v in found)
    lines = "\n".join(f"  {v.line()}" for v in found)
    return (f"version {candidate.number} does not pass {failed} of its {len(found)} promotion gates "
            f"against {CHAMPION} version {champion.number}:\n{lines}\nUse --force to promote anyway")


def _move(client, name: str, alias: str, new, old) -> str:
    client.set_registered_model_alias(name, alias, str(new.version))
    was = f"version {old.version}" if old is not None else "nothing"
    return f"{name}@{alias}: {was} -> version {new.version}"


@dataclass(frozen=True)
class Promotion:
    """What `promote` decided: every gate's verdict against the champion it replaced (none for the first), and
    the aliases it moved."""

    verdicts: list[Verdict]
    moved: list[str]

    def lines(self) -> list[str]:
        return [f"gate {v.line()}" for v in self.verdicts] + self.moved


def promote(client, name: str, version: str | None = None, force: bool = False) -> Promotion:
    """Moves `champion` to the version (default: the candidate) if it passes every promotion gate against the
    champion (or `force`); the verdicts are recorded on the version (tags and model card) either way."""
    target = get_version(client, name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(target.version):
        raise RegistryError(f"version {target.version} is already the {CHAMPION}")
    candidate = Version.of(target, client)
    holder = Version.of(champion, client) if champion is not None else None
    found = verdicts(candidate, holder) if holder is not None else []
    reason = refusal(candidate, holder, force=False) if holder is not None else None
    decision = "accepted" if reason is None else ("forced" if force else "refused")
    if holder is not None:
        record(client, target, holder, found, decision)
    if reason and not force:
        raise RegistryError(reason)
    moved = []
    if champion is not None:
        moved.append(_move(client, name, PREVIOUS, champion, alias_version(client, name, PREVIOUS)))
    moved.append(_move(client, name, CHAMPION, target, champion))
    return Promotion(found, moved)


def record(client, mv, champion: Version, found: list[Verdict], decision: str) -> None:
    """The gate verdicts on the version: a tag each, the decision, and a section of its model card (replacing
    the one an earlier attempt wrote)."""
    from datetime import datetime, timezone

    for verdict in found:
        client.set_model_version_tag(mv.name, mv.version, *verdict.tag())
    client.set_model_version_tag(mv.name, mv.version, PROMOTION_TAG, f"{decision} against version {champion.number}")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    card = (mv.description or "").split(CARD_GATES)[0]
    section = "\n".join(f"- {v.line()}" for v in found)
    client.update_model_version(mv.name, mv.version, description=f"{card}{CARD_GATES} {CHAMPION} version "
                                f"{champion.number} ({when}): {decision}\n{section}")


def rollback(client, name: str) -> list[str]:
    """Swaps `champion` and `previous`: the previous champion serves again in one step."""
    champion, previous = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"model '{name}' has no '{PREVIOUS}' version to roll back to")
    moved = [_move(client, name, CHAMPION, previous, champion)]
    if champion is not None:
        moved.append(_move(client, name, PREVIOUS, champion, previous))
    return moved


def version_for_run(client, name: str, run_id: str, registration: str | None = None):
    """The newest version already registered from this run, if any; with `registration` (register's digest of
    the served config and the evaluation), only one registered with exactly that (registration is idempotent,
    and a change is a new version)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    if registration is not None:
        found = [mv for mv in found if (mv.tags or {}).get(REGISTRATION_TAG) == registration]
    return max(found, key=lambda mv: int(mv.version)) if found else None
