"""Password and username rules in the spirit of NIST SP 800-63B section 5.1.1.2:
at least 8 characters (Unicode code points after NFKC normalisation), no composition rules,
refused when found in a list of commonly used passwords, when repetitive or sequential, or
when it is the username. Usernames are ASCII letters, digits and `._-` (the PRECIS
IdentifierClass restricted to ASCII, RFC 8264) and must not look like another user's name
(a "skeleton" in the sense of Unicode TS #39: case, 0/o, 1/l/i, rn/m and separators folded)."""

from __future__ import annotations

import re
import unicodedata

from annotation.common_passwords import COMMON_PASSWORDS

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SEQUENCES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiop", "asdfghjkl", "zxcvbnm", "1qaz2wsx3edc")


def password_problem(password: str, username: str | None = None) -> str | None:
    """Why `password` is refused, or None when it is acceptable."""
    if not isinstance(password, str):
        return "password must be text"
    pw = unicodedata.normalize("NFKC", password)
    if len(pw) < MIN_PASSWORD_LENGTH:
        return f"password must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(pw) > MAX_PASSWORD_LENGTH:
        return f"password must be at most {MAX_PASSWORD_LENGTH} characters"
    if not pw.strip():
        return "password must not be only spaces"
    folded = pw.casefold()
    squeezed = "".join(folded.split())
    if folded in COMMON_PASSWORDS or squeezed in COMMON_PASSWORDS or folded.rstrip("0123456789!.?") in COMMON_PASSWORDS:
        return "password is on a list of commonly used passwords; choose another (a few unrelated words work well)"
    if len(set(squeezed)) <= 2:
        return "password repeats one or two characters; choose another"
    if any(squeezed in seq or squeezed in seq[::-1] for seq in _SEQUENCES):
        return "password is a keyboard or alphabet sequence; choose another"
    if username and (username.casefold() == squeezed or (len(username) >= 4 and username.casefold() in folded)):
        return "password must not contain the username"
    return None


def username_problem(username: str) -> str | None:
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        return "username must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None




def skeleton(username: str) -> str:
    """A form under which two usernames that a reader could take for each other are equal."""
    s = unicodedata.normalize("NFKC", username).casefold()
    s = s.replace("rn", "m").replace("vv", "w").replace("cl", "d")
    s = "".join(ch for ch in s if ch not in "._-")
    return s.translate(str.maketrans({"0": "o", "1": "l", "i": "l", "5": "s"}))
