"""The MLflow model registry: versions of the captioner, and the aliases that say which one serves.

`candidate` is the newest registered version, `champion` the one that serves, `previous` the champion
before it. Every decision reads the aliases from the registry itself, so a change made by hand in the
MLflow UI is honoured the same way as one made here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .runtime import FashioncapError

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
CIDER_TAG, BLEU_TAG, DIGEST_TAG, RUN_TAG, COMMIT_TAG = "test_cider_d", "test_bleu_4", "data_digest", "run_id", "git_commit"
PROFILE_TAG = "profile"
CIDER_BEFORE_TAG, INIT_VERSION_TAG = "test_cider_d_before", "init_version"  # the init's score on the same test set
# register's digest of what a version serves and was evaluated with (served config, test table): the same
# run registered again with a different one is a new version
REGISTRATION_TAG = "registration_digest"
# Profiles whose models are demonstrations (a small model on a synthetic catalogue, the test suite's tiny
# params): never a shop's champion by accident, whatever they score on their own test set.
DEMO_PROFILES = ("offline", "offline-adapt")


class RegistryError(FashioncapError):
    """A registry operation that cannot or must not happen; the message says why."""


@dataclass(frozen=True)
class Version:
    """What promotion needs to know about a model version."""

    number: str
    cider_d: float
    digest: str
    profile: str = "unknown"
    init_version: str | None = None  # the registry version it was fine-tuned from (same registered model)
    cider_d_before: float | None = None  # that version's score on this version's test set

    @classmethod
    def of(cls, mv, client=None) -> "Version":
        """The version's tags; a version registered before the profile tag takes its run's `profile` tag."""
        tags = mv.tags or {}
        if CIDER_TAG not in tags or DIGEST_TAG not in tags:
            raise RegistryError(f"version {mv.version} has no '{CIDER_TAG}'/'{DIGEST_TAG}' tags to compare by")
        before, init = tags.get(CIDER_BEFORE_TAG), tags.get(INIT_VERSION_TAG)
        if tags.get("init_uri") != f"models:/{mv.name}/{init}":
            init = None  # not a version of this registered model
        return cls(str(mv.version), float(tags[CIDER_TAG]), tags[DIGEST_TAG], tags.get(PROFILE_TAG)
                   or _run_profile(client, mv) or "unknown", init, float(before) if before is not None else None)


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


def refusal(candidate: Version, champion: Version | None, force: bool) -> str | None:
    """Why the candidate must not replace the champion, or None when it may."""
    if champion is None or force:
        return None
    if candidate.number == champion.number:
        return f"version {candidate.number} is already the {CHAMPION}"
    if candidate.profile in DEMO_PROFILES and champion.profile not in DEMO_PROFILES:
        return (f"version {candidate.number} was trained by the '{candidate.profile}' profile, a demonstration, and "
                f"{CHAMPION} version {champion.number} by the '{champion.profile}' profile: a demonstration model "
                f"does not replace it. Use --force to promote anyway")
    if candidate.digest != champion.digest and candidate.init_version == champion.number \
            and candidate.cider_d_before is not None:
        # fine-tuned from the champion on other data: its `before` is the champion's score on its own test set
        if candidate.cider_d <= candidate.cider_d_before:
            return (f"version {candidate.number} (test CIDEr-D {candidate.cider_d:.4f}) does not beat {CHAMPION} "
                    f"version {champion.number}, which it was fine-tuned from, on its test set ({champion.number} "
                    f"scored {candidate.cider_d_before:.4f} there). Use --force to promote anyway")
        return None
    if candidate.digest != champion.digest:
        return (f"version {candidate.number} was tested on another test set (digest {candidate.digest[:12]}) than "
                f"{CHAMPION} version {champion.number} ({champion.digest[:12]}); their scores do not compare. "
                f"Use --force to promote anyway")
    if candidate.cider_d <= champion.cider_d:
        return (f"version {candidate.number} (test CIDEr-D {candidate.cider_d:.4f}) does not beat {CHAMPION} "
                f"version {champion.number} ({champion.cider_d:.4f}). Use --force to promote anyway")
    return None


def _move(client, name: str, alias: str, new, old) -> str:
    client.set_registered_model_alias(name, alias, str(new.version))
    was = f"version {old.version}" if old is not None else "nothing"
    return f"{name}@{alias}: {was} -> version {new.version}"


def promote(client, name: str, version: str | None = None, force: bool = False) -> list[str]:
    """Moves `champion` to the version (default: the candidate) if it beats the champion; returns what moved."""
    target = get_version(client, name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(target.version):
        raise RegistryError(f"version {target.version} is already the {CHAMPION}")
    reason = refusal(Version.of(target, client), Version.of(champion, client) if champion is not None else None, force)
    if reason:
        raise RegistryError(reason)
    moved = []
    if champion is not None:
        moved.append(_move(client, name, PREVIOUS, champion, alias_version(client, name, PREVIOUS)))
    moved.append(_move(client, name, CHAMPION, target, champion))
    return moved


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
