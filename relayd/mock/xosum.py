"""The mock's Xosum: `getTranscription` answers with the fields the document lists for each
status (`shared/providers/xosum-get-transcription.txt`)."""

from __future__ import annotations

from typing import Any

from relayd.mock.jobs import MockJob, iso

STAGES = ((0.2, "uploading"), (0.4, "converting"), (1.0, "processing"))
BASE_FIELDS = ("docId", "status", "createdAt", "type", "duration", "metadata")


def answer(job: MockJob, status: str | None) -> dict[str, Any]:
    """Xosum's answer: the base fields always (`duration` once the upload is in), the
    transcript fields once `transcribed`, `error` once `failed`."""
    answer: dict[str, Any] = {
        "docId": job.doc_id,
        "status": status or job.outcome,
        "createdAt": iso(job.first_seen),
        "type": job.media_type,
        "duration": None if status == "uploading" else job.duration,
        "metadata": {},
    }
    answer |= {k: v for k, v in job.fields.items() if k in BASE_FIELDS and k != "status"}
    if status is not None:
        return answer | job.progress
    if job.outcome == "failed":
        answer["error"] = "The audio could not be decoded."
    else:
        answer |= {
            "transcription": _text(job),
            "title": f"Ձայնագրություն {job.doc_id}",
            "resolution": (
                f"Ձայնագրությունում ({job.doc_id}) խոսնակը ներկայացնում է օրվա աշխատանքը, "
                "նշում է հաջորդ քայլերը և ամփոփում է քննարկումը։"
            ),
            "languageCode": "hy-AM",
        }
    return answer | job.fields


def _text(job: MockJob) -> str:
    """Plain text for `single_voice`; a `phone_call` is diarized with Xosum's speaker labels."""
    if job.media_type == "phone_call":
        return (
            f"Խոսնակ 1: Բարև ձեզ, զանգում եմ {job.doc_id} հայտի մասին։\n"
            "Խոսնակ 2: Բարև, լսում եմ ձեզ։\n"
            "Խոսնակ 1: Շնորհակալություն, ցտեսություն։"
        )
    return f"Սա {job.doc_id} ձայնագրության փորձնական վերծանումն է։"
