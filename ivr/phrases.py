"""What the IVR and the dunning calls say, in Mandarin. Pure: text only,
amounts and dates through ivr.chinese_numerals."""
from __future__ import annotations

from ivr.accounts import Overview
from ivr.chinese_numerals import account_digits, date_words, fen_words

ENTER_ACCOUNT = "您好，欢迎使用电费自助查询。请输入十位户号，以井号键结束。"
REENTER_BAD_NUMBER = "您输入的户号有误，请重新输入十位户号，以井号键结束。"
REENTER_UNKNOWN = "没有查到这个户号，请核对后重新输入十位户号，以井号键结束。"
TOO_MANY_ATTEMPTS = "输入错误次数过多，请核对户号后再拨。再见。"
SERVICE_UNAVAILABLE = "系统繁忙，请稍后再拨。再见。"
MENU = "重听请按一，查询最近一次缴费请按二，结束请按零。"
GOODBYE = "感谢您的来电，再见。"

_CHANNELS = {"COUNTER": "银行柜台", "AUTO_DEBIT": "银行代扣", "ATM": "自助设备", "ONLINE": "网上缴费"}


def summary(o: Overview) -> str:
    head = f"户号尾号{account_digits(o.account_no[-4:])}。"
    if o.total_due_fen == 0:
        return head + f"您目前没有欠费，预存余额{fen_words(o.prepaid_fen)}。"
    text = head + (f"您目前欠费{fen_words(o.arrears_fen)}，违约金{fen_words(o.late_fee_fen)}，"
                   f"合计{fen_words(o.total_due_fen)}。")
    if o.earliest_unpaid_due_date is not None:
        # The oldest unpaid bill's due date: once past, its late fee is running.
        text += f"缴费截止日期是{date_words(o.earliest_unpaid_due_date)}。"
    return text


def last_payment(o: Overview) -> str:
    p = o.last_payment
    if p is None:
        return "没有查到缴费记录。"
    channel = _CHANNELS.get(p.channel, "")
    via = f"，缴费方式{channel}" if channel else ""
    return f"最近一次缴费是{date_words(p.date)}，金额{fen_words(p.amount_fen)}{via}。"


def dunning_reminder(account_no: str, arrears_fen: int, late_fee_fen: int, due_date_words: str) -> str:
    """The personalised voice reminder (催费) a household hears when it answers."""
    return (f"您好，这里是供电公司。您户号尾号{account_digits(account_no[-4:])}的电费账户目前欠费"
            f"{fen_words(arrears_fen)}，违约金{fen_words(late_fee_fen)}，最早一笔电费的缴费截止日期是"
            f"{due_date_words}。请您尽快缴纳，以免影响用电。如已缴纳，请忽略本次提醒。谢谢。")
