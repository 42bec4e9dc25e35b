#!/usr/bin/python3 -IS
"""condor_chirp (also carod-chirp) for jobs run by carod: set_job_attr and get_job_attr.

carod puts this file, with the node's python3 in its first line, at
/usr/libexec/condor/condor_chirp in the sandbox of a job with
``WantIOProxy = TRUE``, beside the socket of that job's chirp server
(carod.node.chirp). It runs as the job user, with ``python3 -IS`` (no site
packages, no environment variables), and imports only built-in modules
(``_socket``, ``posix``: no ``socket``, ``os`` or ``json``, which would
double its start-up time); the protocol is carod.wire.chirp's.

Exit codes and messages are HTCondor's condor_chirp's: 0 when done; 255
(its -1) for a usage error, a connection that fails ("cannot chirp_connect
to shadow") or a refused request, which also prints ``Error: N (text)``
with the request's errno. Everything but a value asked for goes to stderr.
"""

from __future__ import annotations

import _socket
import posix
import sys

#: The socket of this job's chirp server, beside this file.
SOCKET = __file__.rpartition("/")[0] + "/carod-chirp.sock" if "/" in __file__ else "carod-chirp.sock"
TIMEOUT_S = 30.0
MAX_LINE_BYTES = 4096
FAILED = 255  # HTCondor's condor_chirp returns -1 from main
EIO = 5

USAGE = (
    "Usage:\n"
    "condor_chirp get_job_attr job_attribute\n"
    "condor_chirp set_job_attr job_attribute attribute_value\n"
    "(carod's condor_chirp does only these two)\n"
)


def json_text(text: str) -> str:
    """``text`` as a JSON string literal (what json.dumps gives, without importing json)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or "\ud800" <= ch <= "\udfff":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def request(fields: dict[str, str]) -> bytes:
    """Send one request and read its answer line. Raises OSError."""
    line = "{" + ", ".join(f"{json_text(k)}: {json_text(v)}" for k, v in fields.items()) + "}\n"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT_S)
        sock.connect(SOCKET)
        try:
            sock.sendall(line.encode())
            sock.shutdown(_socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered without reading (e.g. busy) and closed: its answer is still to be read
        data = b""
        while len(data) <= MAX_LINE_BYTES:
            chunk = sock.recv(MAX_LINE_BYTES + 1)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return data


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "-help", "--help"):
        sys.stderr.write(USAGE)
        return FAILED
    command = argv[1]
    if command == "set_job_attr":
        if len(argv) != 4:
            sys.stderr.write("condor_chirp set_job_attr AttributeName AttributeValue\n")
            return FAILED
        fields = {"op": command, "name": argv[2], "value": argv[3]}
    elif command == "get_job_attr":
        if len(argv) != 3:
            sys.stderr.write("condor_chirp get_job_attr AttributeName\n")
            return FAILED
        fields = {"op": command, "name": argv[2]}
    else:
        sys.stderr.write(f"Unknown command {command}\n" + USAGE)
        return FAILED
    try:
        answer = request(fields).decode("utf-8", "replace")
    except OSError as exc:
        code = exc.errno or EIO
        sys.stderr.write("cannot chirp_connect to shadow\n")
        sys.stderr.write(f"condor_chirp: carod's chirp server at {SOCKET} did not answer: {exc.strerror or exc}\n")
        sys.stderr.write(f"\tError: {code} ({posix.strerror(code)})\n")
        return FAILED
    if not answer.endswith("\n"):
        sys.stderr.write("cannot chirp_connect to shadow\n")
        sys.stderr.write(f"condor_chirp: carod's chirp server at {SOCKET} gave no whole answer\n")
        sys.stderr.write(f"\tError: {EIO} ({posix.strerror(EIO)})\n")
        return FAILED
    answer = answer[:-1]
    if answer == "ok" or answer.startswith("ok "):
        if command == "get_job_attr":
            sys.stdout.write(answer[3:] + "\n")
        return 0
    _, _, rest = answer.partition(" ")
    given, _, message = rest.partition(" ")
    code = int(given) if given.isdigit() and 0 < int(given) < 4096 else EIO
    sys.stderr.write(f"condor_chirp: {command} {argv[2]}: {message or 'refused'}\n")
    sys.stderr.write(f"\tError: {code} ({posix.strerror(code)})\n")
    return FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
