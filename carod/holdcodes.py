"""HTCondor's HoldReasonCode values that carod uses (condor_holdcodes.h)."""

from __future__ import annotations

import enum


class HoldCode(enum.IntEnum):
    UNSPECIFIED = 0
    USER_REQUEST = 1
    JOB_POLICY = 3
    #: a job policy (here: the job ad itself) could not be evaluated
    JOB_POLICY_UNDEFINED = 21
    FAILED_TO_CREATE_PROCESS = 6
    UNABLE_TO_OPEN_OUTPUT = 7
    UNABLE_TO_OPEN_INPUT = 8
    TRANSFER_OUTPUT_ERROR = 12
    TRANSFER_INPUT_ERROR = 13
    IWD_ERROR = 14
    FAILED_TO_ACCESS_USER_ACCOUNT = 23
    MAX_TRANSFER_INPUT_SIZE_EXCEEDED = 32
    MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED = 33
    JOB_OUT_OF_RESOURCES = 34
    JOB_DURATION_EXCEEDED = 46
    JOB_EXECUTE_EXCEEDED = 47
