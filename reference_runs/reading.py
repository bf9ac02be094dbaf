"""The hand-written part of reference_runs/README.md: what the tables mean. Words only: every
number the README shows is computed by report.py from the run folders."""

READING = {
    "setting": "(the setting: to be written)",
    "main": "(reading: to be written when the runs are in)",
    "pairs": "",
    "sweep": "",
    "label_free": "",
    "overlap": "",
    "real_data": "",
}
