"""llmjax.serve's chat page (GET /) in headless Chromium: a typed message gets the streamed reply
that /v1/chat/completions gives for the page's sampling parameters, the reply joins the
conversation, and Stop ends a running reply. Skipped where no browser is installed (Debian:
apt-get install chromium chromium-driver; Selenium drives that binary, never a downloaded one)."""

import shutil
import time

import pytest

from test_serve import Live, _slow, workdir  # noqa: F401 (workdir: the module's fixture)

webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is not installed')
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
DRIVER = shutil.which('chromedriver')
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason='no headless browser: apt-get install chromium chromium-driver to run this test')


@pytest.fixture(scope='module')
def page(workdir):  # noqa: F811
  live = Live(workdir, max_batch=32)  # test_serve.py's `live` shapes: its compiles are cached
  options = webdriver.ChromeOptions()
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'):
    options.add_argument(arg)
  options.binary_location = CHROMIUM
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
  driver.get(live.url + '/')
  yield live, driver
  driver.quit()
  live.stop()


def _set(driver, name, value):
  box = driver.find_element(By.ID, name)
  box.clear()
  box.send_keys(str(value))


def _say(driver, text):
  driver.find_element(By.ID, 'input').send_keys(text)
  driver.find_element(By.ID, 'send').click()


def _last_reply(driver, timeout=60):
  deadline = time.time() + timeout
  while time.time() < deadline:
    done = driver.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="true"], .msg.error')
    if done and len(done) == len(driver.find_elements(By.CSS_SELECTOR, '.msg.assistant, .msg.error')):
      return done[-1]
    time.sleep(0.05)
  raise AssertionError('no reply in the page')


def test_a_typed_message_gets_the_streamed_reply(page):
  live, driver = page
  assert driver.find_element(By.ID, 'model').text == live.model
  _set(driver, 'temperature', 0)
  _set(driver, 'max_tokens', 12)
  _say(driver, 'What is the capital of Peru?')
  reply = _last_reply(driver)
  want = live.client.chat.completions.create(
      model=live.model, temperature=0, max_tokens=12, top_p=1, seed=None,
      messages=[{'role': 'user', 'content': 'What is the capital of Peru?'}],
      extra_body={'top_k': 0, 'min_p': 0, 'repetition_penalty': 1}).choices[0].message.content
  assert want and reply.get_attribute('class') == 'msg assistant'
  # textContent: the reply as streamed (Selenium's .text trims whitespace).
  assert reply.get_attribute('textContent') == want
  # The next turn's prompt holds the first exchange: the reply differs from a fresh chat's.
  _say(driver, 'And of Chile?')
  second = _last_reply(driver).get_attribute('textContent')
  history = [{'role': 'user', 'content': 'What is the capital of Peru?'},
             {'role': 'assistant', 'content': want}, {'role': 'user', 'content': 'And of Chile?'}]
  assert second == live.client.chat.completions.create(
      model=live.model, temperature=0, max_tokens=12, messages=history).choices[0].message.content


def test_stop_ends_a_running_reply(page):
  live, driver = page
  driver.find_element(By.ID, 'reset').click()
  _set(driver, 'max_tokens', 60)
  undo = _slow(live, 0.05)  # 60 tokens: 3 s, time to press Stop
  try:
    cancelled = live.served.metrics.success.labels(finished_reason='cancelled')._value.get()
    _say(driver, 'Tell me a story.')
    deadline = time.time() + 30
    while not driver.find_elements(By.CSS_SELECTOR, '.msg.assistant') or not driver.find_element(
        By.CSS_SELECTOR, '.msg.assistant').get_attribute('textContent'):
      assert time.time() < deadline, 'no streamed text'
      time.sleep(0.02)
    driver.find_element(By.ID, 'stop').click()
    reply = _last_reply(driver)
    deadline = time.time() + 5
    while live.served.engine.num_running:
      assert time.time() < deadline, 'the slot was not freed'
      time.sleep(0.02)
    assert live.served.metrics.success.labels(finished_reason='cancelled')._value.get() == cancelled + 1
    assert reply.get_attribute('textContent')  # what was streamed stays
    assert driver.find_element(By.ID, 'send').is_enabled()
  finally:
    undo()
