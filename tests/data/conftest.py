import os

# never touch the network (punkt_tab is written from the local `punkt` package, see rewards/ifeval.py)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
