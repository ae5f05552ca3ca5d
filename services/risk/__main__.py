from services.risk.service import RiskService
from shared.service import run_service

if __name__ == "__main__":
    run_service(RiskService)
