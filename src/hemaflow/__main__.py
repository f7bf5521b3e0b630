from hemaflow.cli import app

app(prog_name="hemaflow")
