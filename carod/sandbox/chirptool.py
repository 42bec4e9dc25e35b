#!/usr/bin/python3 -IS
"""condor_chirp (also carod-chirp) for jobs run by carod: set_job_attr and get_job_attr.

carod puts this file, with the node's python3 in its first line, at
/usr/libexec/condor/condor_chirp in the sandbox of a job with
``WantIOProxy = TRUE``, beside the socket of that job's chirp server
(carod.node.chirp). Standard library only: it runs as the job user, with
``python3 -I -S`` (no site packages, no environment variables).

Exit codes and messages are HTCondor's condor_chirp's: 0 when done; 255
(its -1) for a usage error, a connection that fails ("cannot chirp_connect
to shadow") or a refused request, which also prints ``Error: N (text)``
with the request's errno. Everything but a value asked for goes to stderr.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

#: The socket of this job's chirp server, beside this file.
SOCKET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "carod-chirp.sock")
TIMEOUT_S = 30.0
MAX_LINE_BYTES = 4096
FAILED = 255  # HTCondor's condor_chirp returns -1 from main

USAGE = (
    "Usage:\n"
    "condor_chirp get_job_attr job_attribute\n"
    "condor_chirp set_job_attr job_attribute attribute_value\n"
    "(carod's condor_chirp does only these two)\n"
)


def request(fields: dict[str, str]) -> dict[str, object]:
    """Send one request and read its answer. Raises OSError, ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(SOCKET)
        sock.sendall(json.dumps(fields).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while len(data) <= MAX_LINE_BYTES:
            chunk = sock.recv(MAX_LINE_BYTES + 1)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data.decode("utf-8"))
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    return answer


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
        answer = request(fields)
    except (OSError, ValueError, UnicodeError) as exc:
        sys.stderr.write("cannot chirp_connect to shadow\n")
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        sys.stderr.write(f"condor_chirp: carod's chirp server at {SOCKET} did not answer: {why}\n")
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        sys.stderr.write(f"\tError: {code} ({os.strerror(code)})\n")
        return FAILED
    if answer.get("ok") is True:
        value = answer.get("value")
        if command == "get_job_attr":
            sys.stdout.write(f"{value if isinstance(value, str) else 'UNDEFINED'}\n")
        return 0
    given = answer.get("errno")
    code = given if isinstance(given, int) and 0 < given < 4096 else errno.EIO
    sys.stderr.write(f"condor_chirp: {command} {argv[2]}: {answer.get('error', 'refused')}\n")
    sys.stderr.write(f"\tError: {code} ({os.strerror(code)})\n")
    return FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
