"""The portal's words in Chinese (the default) and English, and how money,
months and dates read in each. Pure: no I/O."""
from __future__ import annotations

import datetime as dt
from typing import Final

LANGS: Final = ("zh", "en")
DEFAULT_LANG: Final = "zh"

MESSAGES: Final[dict[str, dict[str, str]]] = {
    "zh": {
        "html_lang": "zh-CN",
        "title": "电费及用电查询",
        "utility": "供电公司客户服务",
        "intro": "请输入户号和账户预留手机号码的后四位。",
        "account_no": "户号",
        "account_hint": "10位数字，见电费单",
        "phone_last4": "手机号后四位",
        "submit": "查询",
        "switch": "English",
        "no_match": "户号或手机号后四位不正确，请核对后重试。",
        "bad_account": "户号应为10位数字，且须与电费单上的户号一致，请核对。",
        "bad_phone": "请输入预留手机号码的后四位数字。",
        "limited": "查询次数过多，请稍后再试。",
        "unavailable": "查询服务暂时不可用，请稍后再试。",
        "unavailable_title": "服务暂不可用",
        "expired": "页面已过期，请返回重新查询。",
        "back": "返回查询",
        "not_found_page": "未找到该页面。",
        "customer": "户名",
        "address": "用电地址",
        "as_of": "数据截至",
        "arrears": "欠费金额",
        "late_fee": "违约金",
        "prepaid": "预存余额",
        "total_due": "应缴合计",
        "earliest_due": "最早欠费到期日",
        "nothing_due": "目前无欠费",
        "closed": "该户已销户",
        "last_payment": "最近一次缴费",
        "no_payment": "暂无缴费记录",
        "bills": "近期账单",
        "period": "账期",
        "kwh": "用电量(千瓦时)",
        "amount": "电费",
        "late_fee_col": "违约金",
        "status": "状态",
        "due_date": "到期日",
        "paid_date": "缴清日期",
        "channel": "缴费渠道",
        "no_bills": "暂无账单",
        "chart_title": "月用电量与电费",
        "legend_kwh": "用电量(千瓦时)",
        "legend_charge": "电费(元)",
        "status_UNPAID": "未缴",
        "status_PARTIAL": "部分缴费",
        "status_PAID": "已缴清",
        "channel_COUNTER": "银行柜台",
        "channel_AUTO_DEBIT": "银行代扣",
        "channel_ATM": "自助终端",
        "channel_ONLINE": "网上缴费",
        "channel_PREPAID": "预存抵扣",
        "privacy": "为保护您的隐私，户名和地址已部分隐藏。",
        "another": "查询其他户号",
    },
    "en": {
        "html_lang": "en",
        "title": "Electricity bill and usage",
        "utility": "Power supply customer service",
        "intro": "Enter your account number and the last four digits of the phone number registered "
                 "for the account.",
        "account_no": "Account number",
        "account_hint": "10 digits, printed on your bill",
        "phone_last4": "Last 4 digits of phone",
        "submit": "Look up",
        "switch": "中文",
        "no_match": "The account number or the phone digits are not correct. Please check them and try again.",
        "bad_account": "An account number has 10 digits and must match the one on your bill. Please check it.",
        "bad_phone": "Enter the last four digits of your registered phone number.",
        "limited": "Too many attempts. Please try again later.",
        "unavailable": "The look-up service is temporarily unavailable. Please try again later.",
        "unavailable_title": "Service unavailable",
        "expired": "This page has expired. Please go back and look up again.",
        "back": "Back to look-up",
        "not_found_page": "Page not found.",
        "customer": "Account holder",
        "address": "Supply address",
        "as_of": "As of",
        "arrears": "Arrears",
        "late_fee": "Late fee",
        "prepaid": "Prepaid credit",
        "total_due": "Total due",
        "earliest_due": "Oldest unpaid bill due",
        "nothing_due": "Nothing is owed",
        "closed": "This account is closed",
        "last_payment": "Last payment",
        "no_payment": "No payment yet",
        "bills": "Recent bills",
        "period": "Month",
        "kwh": "Usage (kWh)",
        "amount": "Charge",
        "late_fee_col": "Late fee",
        "status": "Status",
        "due_date": "Due",
        "paid_date": "Paid on",
        "channel": "Paid via",
        "no_bills": "No bills yet",
        "chart_title": "Monthly consumption and charges",
        "legend_kwh": "Usage (kWh)",
        "legend_charge": "Charge (yuan)",
        "status_UNPAID": "Unpaid",
        "status_PARTIAL": "Part paid",
        "status_PAID": "Paid",
        "channel_COUNTER": "Bank counter",
        "channel_AUTO_DEBIT": "Bank auto-debit",
        "channel_ATM": "Self-service terminal",
        "channel_ONLINE": "Online",
        "channel_PREPAID": "Prepaid credit",
        "privacy": "For your privacy, the name and address are partly hidden.",
        "another": "Look up another account",
    },
}


def lang_of(value: str | None) -> str:
    return value if value in LANGS else DEFAULT_LANG


def yuan(fen: int) -> str:
    """Integer fen as yuan with thousands separators: 123456 -> '1,234.56'."""
    sign = "-" if fen < 0 else ""
    whole, part = divmod(abs(fen), 100)
    return f"{sign}{whole:,}.{part:02d}"


def money(fen: int, lang: str) -> str:
    return f"{yuan(fen)} 元" if lang == "zh" else f"¥{yuan(fen)}"


def month(period: str, lang: str, *, short: bool = False) -> str:
    """'202610' -> '2026年10月' / 'Oct 2026' (short: '10月' / 'Oct')."""
    y, m = int(period[:4]), int(period[4:])
    if lang == "zh":
        return f"{m}月" if short else f"{y}年{m}月"
    name = dt.date(y, m, 1).strftime("%b")
    return name if short else f"{name} {y}"


def date(d: dt.date | None, lang: str) -> str:
    if d is None:
        return "—"
    return f"{d.year}年{d.month}月{d.day}日" if lang == "zh" else d.isoformat()
