from services.alerter.service import AlerterService
from shared.service import run_service

if __name__ == "__main__":
    run_service(AlerterService)
