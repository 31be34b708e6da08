"""Validates cairn's OpenLineage events with the reference client (openlineage-python).

Reads JSON lines on stdin; builds each event from the client's classes generated from
the OpenLineage JSON schema (their attrs validators check the UUIDs, times, URIs and
required fields, and each class writes its own schemaURL), serializes it with the
client's Serde, and requires the result to equal the event as cairn wrote it.
"""

import json
import sys

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import error_message_run, job_type_job, parent_run
from openlineage.client.serde import Serde


def facet_base(raw):
    return {"producer": raw["_producer"]}


def run_facets(raw):
    out = {}
    for name, facet in raw.items():
        if name == "parent":
            out[name] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=facet["run"]["runId"]),
                job=parent_run.Job(namespace=facet["job"]["namespace"], name=facet["job"]["name"]),
                **facet_base(facet),
            )
        elif name == "errorMessage":
            out[name] = error_message_run.ErrorMessageRunFacet(
                message=facet["message"],
                programmingLanguage=facet["programmingLanguage"],
                **facet_base(facet),
            )
        else:
            raise SystemExit(f"unexpected run facet {name}")
    return out


def job_facets(raw):
    out = {}
    for name, facet in raw.items():
        if name != "jobType":
            raise SystemExit(f"unexpected job facet {name}")
        out[name] = job_type_job.JobTypeJobFacet(
            processingType=facet["processingType"],
            integration=facet["integration"],
            jobType=facet["jobType"],
            **facet_base(facet),
        )
    return out


def rebuild(event):
    return RunEvent(
        eventType=RunState(event["eventType"]),
        eventTime=event["eventTime"],
        producer=event["producer"],
        run=Run(runId=event["run"]["runId"], facets=run_facets(event["run"]["facets"])),
        job=Job(
            namespace=event["job"]["namespace"],
            name=event["job"]["name"],
            facets=job_facets(event["job"]["facets"]),
        ),
        inputs=[InputDataset(namespace=d["namespace"], name=d["name"]) for d in event["inputs"]],
        outputs=[OutputDataset(namespace=d["namespace"], name=d["name"]) for d in event["outputs"]],
    )


def strip_empty(value):
    """The client drops empty facet maps; so does this comparison."""
    if isinstance(value, dict):
        return {k: strip_empty(v) for k, v in value.items() if v != {}}
    if isinstance(value, list):
        return [strip_empty(v) for v in value]
    return value


def main():
    events = [json.loads(line) for line in sys.stdin if line.strip()]
    for i, event in enumerate(events):
        rebuilt = Serde.to_dict(rebuild(event))
        if strip_empty(rebuilt) != strip_empty(event):
            print(f"event {i} differs from the spec's serialization:")
            print(json.dumps(strip_empty(event), sort_keys=True, indent=1))
            print(json.dumps(strip_empty(rebuilt), sort_keys=True, indent=1))
            raise SystemExit(1)
    print(f"{len(events)} events valid")


if __name__ == "__main__":
    main()
