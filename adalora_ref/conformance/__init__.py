"""The conformance suite: golden cases from peft, the reference's answers, and the judge.

case       the on-disk format of golden cases (JSON + safetensors + MANIFEST.json): reading, writing
validate   the rules a cases folder, its manifest and each case must meet before anything is trusted
reference  what adalora_ref answers for each case kind
compare    judging outputs check by check, every failing check recorded
diagnosis  the failing checks grouped by quantity, in computation order, consequences marked
mistakes   recognisers of common port mistakes (docs/SPEC.md section 18)
results    the data a judgement produces (CaseResult, CheckFailure, ...)
report     the printed table and each failing case's diagnosis
port       reading a port's outputs and its port.json (docs/SPEC.md, "Writing a port's outputs")
runner     `adalora-ref conform`: selects and runs cases, prints the table, writes the reports
junit      the results as JUnit XML (`conform --junit`), for a port's CI
export     `adalora-ref cases list | export DIR`: the cases as plain files for a port
"""
