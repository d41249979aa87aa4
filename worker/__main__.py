from app.config import get_settings
from worker.main import run_worker

run_worker(get_settings())
