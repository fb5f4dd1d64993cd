from mlflow_dock.cli import main

main()
