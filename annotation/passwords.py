"""Password and username rules after NIST SP 800-63B-4 section 3.1.1.2, for accounts whose
password is their only factor: at least 15 characters (Unicode code points after NFKC
normalisation), no composition rules, and refused when it is on a blocklist of
known-compromised passwords (the 30,000 most frequent ones in leaked password sets, as
zxcvbn ships them, so the list is maintained with that package rather than by hand), when
it contains the username, or when zxcvbn's estimator finds it guessable in under a million
tries (a word repeated, a keyboard row, a run of the alphabet: NIST's "repetitive or
sequential"). Accounts made under an older rule keep working; `needs_change` tells the
sign-in that the one just used no longer passes, and the pages ask for a new one.

Usernames are ASCII letters, digits and `._-` (the PRECIS IdentifierClass restricted to
ASCII, RFC 8264) and must not look like another user's name (a "skeleton" in the sense of
Unicode TS #39: case, 0/o, 1/l/i, rn/m and separators folded)."""

from __future__ import annotations

import functools
import re
import unicodedata

MIN_PASSWORD_LENGTH = 15
MAX_PASSWORD_LENGTH = 1024
POLICY = (f"at least {MIN_PASSWORD_LENGTH} characters, not a known-compromised or common password "
          "(a few unrelated words work well)")
# 1-60 characters: exported and imported elsewhere, a user's rankings go to the account src:<name>
# (annotation.services.users), which must fit the 64 characters a username column holds
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")


@functools.cache
def blocklist() -> frozenset[str]:
    """Known-compromised passwords, lower case: zxcvbn's list of the most frequent passwords
    in leaked sets. Read once, on first use (about 0.1 s)."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def password_problem(password: str, username: str | None = None) -> str | None:
    """Why `password` is refused, or None when it is acceptable."""
    if not isinstance(password, str):
        return "password must be text"
    pw = unicodedata.normalize("NFKC", password)
    if len(pw) < MIN_PASSWORD_LENGTH:
        return f"password must be at least {MIN_PASSWORD_LENGTH} characters (a few unrelated words work well)"
    if len(pw) > MAX_PASSWORD_LENGTH:
        return f"password must be at most {MAX_PASSWORD_LENGTH} characters"
    if not pw.strip():
        return "password must not be only spaces"
    folded = pw.casefold()
    squeezed = "".join(folded.split())
    listed = blocklist()
    # Also the forms people make of a listed password to pass a length rule: spaces taken
    # out, digits or punctuation added at the end.
    if any(form in listed for form in (folded, squeezed, folded.rstrip("0123456789!.?"), squeezed.rstrip("0123456789!.?"))):
        return "password is on a list of known-compromised passwords; choose another (a few unrelated words work well)"
    if len(set(squeezed)) <= 2:
        return "password repeats one or two characters; choose another"
    if username and (username.casefold() == squeezed or (len(username) >= 4 and username.casefold() in folded)):
        return "password must not contain the username"
    if easy := easy_to_guess(pw):
        return f"password is easy to guess ({easy}); choose another (a few unrelated words work well)"
    return None


# zxcvbn's time grows steeply with length (its l33t matching): on a 2-core VM 24 characters take at
# most about 70 ms, 72 up to 1.2 s, and the rule is checked on every sign-in and password change
ESTIMATED_CHARACTERS = 24


def easy_to_guess(password: str) -> str | None:
    """What makes `password` guessable in under a million tries by zxcvbn's estimate (its score 0 or 1:
    a word repeated, a keyboard row or a run of the alphabet, however long), or None; judged on its
    first ESTIMATED_CHARACTERS characters, where a repetitive or sequential password shows itself."""
    from zxcvbn import zxcvbn

    estimate = zxcvbn(password[:ESTIMATED_CHARACTERS])
    if estimate["score"] >= 2:
        return None
    patterns = {match["pattern"] for match in estimate["sequence"]}
    return ("a repetition" if "repeat" in patterns else "a sequence or keyboard row" if patterns & {"sequence", "spatial"}
            else "common words or a keyboard pattern")


def needs_change(password: str, username: str) -> bool:
    """Whether a password that just signed its user in falls short of the current rules
    (it was chosen under an older one)."""
    return password_problem(password, username) is not None


def username_problem(username: str) -> str | None:
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        return "username must be 1-60 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def skeleton(username: str) -> str:
    """A form under which two usernames that a reader could take for each other are equal."""
    s = unicodedata.normalize("NFKC", username).casefold()
    s = s.replace("rn", "m").replace("vv", "w").replace("cl", "d")
    s = "".join(ch for ch in s if ch not in "._-")
    return s.translate(str.maketrans({"0": "o", "1": "l", "i": "l", "5": "s"}))
